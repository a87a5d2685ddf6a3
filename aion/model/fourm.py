"""A 4M-style masked multimodal encoder-decoder (Mizrahi et al. 2023; AION-1, Parker et al. 2025).

Each object is a bag of discrete tokens from several modalities. A random subset of them (the
*inputs*) is embedded and read by a transformer encoder; the decoder is asked for another,
disjoint subset (the *targets*) and predicts each target token's id. Which tokens are inputs
and targets is decided outside the model, by :mod:`aion.training.masking`, whose packed-batch
format (documented there) is exactly what :meth:`FourM.forward` consumes.

- **Embeddings.** An input token is ``token_emb[m](id) + modality_emb[m] + position_emb[m][p]``:
  one token table per modality (each with its own vocabulary; stored as row ranges of one
  table so a batch is embedded by a single lookup), a learned modality vector and learned
  positions (``num_tokens`` of them per modality). There is no sequence order: the
  model is permutation-equivariant and the position embedding is all it knows of where a
  token sits in its image grid or spectrum.
- **Encoder.** Pre-norm self-attention blocks over the visible input tokens only.
- **Decoder.** A target query carries no token content (4M): it is the decoder's own
  ``modality_emb[m] + position_emb[m][p]``. Pre-norm blocks of self-attention among the
  targets, cross-attention to the encoder output, and an MLP; then one linear head per
  modality onto that modality's vocabulary.
- **Padding.** Objects have different numbers of inputs and targets; the batch is padded and
  boolean key masks (``scaled_dot_product_attention``) keep padded slots out of every
  attention, so an object's outputs do not depend on what it is batched with.
- **Loss.** Cross-entropy per target token, averaged within each modality first and then
  across the modalities that have targets in the batch (4M): a 576-token image does not
  drown a 1-token redshift.

Every embedding table and head runs in every step (on an empty selection when its modality is
absent), so all parameters always receive a gradient, zero or not, and distributed data
parallel needs no ``find_unused_parameters``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from aion.model.config import ModelConfig

Batch = dict[str, Tensor | tuple[str, ...]]


class Attention(nn.Module):
    """Multi-head attention of queries ``x`` over ``context``; masked-out keys are never attended."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, context: Tensor, key_mask: Tensor) -> Tensor:
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.kv(context), "b n (two h d) -> two b h n d", two=2, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :],
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.qkv_bias, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.dim, int(cfg.dim * cfg.mlp_ratio), cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, mask)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg.dim, cfg.heads, cfg.qkv_bias, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.cross_attn = Attention(cfg.dim, cfg.heads, cfg.qkv_bias, cfg.dropout)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.dim, int(cfg.dim * cfg.mlp_ratio), cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor, context: Tensor, context_mask: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h, mask)
        x = x + self.cross_attn(self.norm2(x), context, context_mask)
        return x + self.mlp(self.norm3(x))


def _key_mask(mask: Tensor) -> Tensor:
    """Padding mask for attention keys. A row with no valid key (an object without inputs, or
    without targets) attends to all its slots instead of producing NaN; what that object's
    targets would get is then meaningless, and the sampler never makes targets without inputs."""
    return mask | ~mask.any(dim=-1, keepdim=True)


class FourM(nn.Module):
    """Encoder-decoder over packed batches from :func:`aion.training.masking.collate`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.names: tuple[str, ...] = tuple(sorted(cfg.modalities))
        self.index = {name: i for i, name in enumerate(self.names)}
        specs = {n: cfg.modalities[n] for n in self.names}
        counts = [s.num_tokens for s in specs.values()]
        num_tokens, total = torch.tensor(counts), sum(counts)
        d = cfg.dim

        # Token tables of all modalities in one: modality m owns rows vocab_offset[m] .. + vocab_size[m] - 1.
        vocab = torch.tensor([s.vocab_size for s in specs.values()])
        self.token_emb = nn.Embedding(sum(s.vocab_size for s in specs.values()), d)
        self.register_buffer("vocab_offset", torch.cumsum(vocab, 0) - vocab, persistent=False)
        # Ordinal ids (scalar bins) also get a smooth code of their place in their range, so that
        # neighbouring bins start out alike instead of as unrelated random rows (see ModelConfig).
        self.ordinal_emb = None
        if (cfg.ordinal_features > 0 or cfg.ordinal_sigma > 0) and not any(s.ordinal for s in specs.values()):
            raise ValueError("ordinal_features / ordinal_sigma are set but no modality declares ordinal id ranges: "
                             "the token index predates them; re-run `aion tokenize` (it writes 'ordinal')")
        if cfg.ordinal_features > 0:
            place = torch.full((int(vocab.sum()),), -1.0)
            offset = 0
            for s in specs.values():
                for lo, hi in s.ordinal:
                    place[offset + lo: offset + hi] = (torch.arange(hi - lo) + 0.5) / (hi - lo)
                offset += s.vocab_size
            self.register_buffer("ordinal_place", place, persistent=False)
            self.ordinal_emb = nn.Linear(2 * cfg.ordinal_features + 1, d)
        # Modality and position embeddings, separately for the encoder (added to token content)
        # and the decoder (they are the whole query). Positions of all modalities live in one
        # table: modality m owns rows pos_offset[m] .. pos_offset[m] + num_tokens[m] - 1.
        self.enc_modality_emb = nn.Embedding(len(specs), d)
        self.dec_modality_emb = nn.Embedding(len(specs), d)
        self.enc_pos_emb = nn.Parameter(torch.empty(total, d))
        self.dec_pos_emb = nn.Parameter(torch.empty(total, d))
        self.register_buffer("pos_offset", torch.cumsum(num_tokens, 0) - num_tokens, persistent=False)
        self.register_buffer("num_tokens", num_tokens, persistent=False)
        self.register_buffer("vocab_size", torch.tensor([s.vocab_size for s in specs.values()]), persistent=False)

        self.encoder = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.encoder_depth))
        self.enc_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.decoder_depth))
        self.dec_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.to_logits = nn.ModuleDict({n: nn.Linear(d, s.vocab_size) for n, s in specs.items()})
        self._init_weights()

    # ------------------------------------------------------------------ setup
    def _init_weights(self) -> None:
        """GPT-2: N(0, 0.02) weights, zero biases, residual-branch outputs scaled by 1/sqrt(#branches)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.enc_pos_emb, std=0.02)
        nn.init.normal_(self.dec_pos_emb, std=0.02)
        for blocks, branches in ((self.encoder, 2), (self.decoder, 3)):
            std = 0.02 / math.sqrt(branches * len(blocks))
            for name, p in blocks.named_parameters():
                if name.endswith(("proj.weight", "fc2.weight")):
                    nn.init.normal_(p, std=std)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; ``exclude_embeddings`` drops token/position/modality tables and heads."""
        skip = ("token_emb.", "to_logits.", "enc_modality_emb.", "dec_modality_emb.", "enc_pos_emb", "dec_pos_emb",
                "ordinal_emb.")
        return sum(p.numel() for n, p in self.named_parameters()
                   if not (exclude_embeddings and n.startswith(skip)))

    def compile_blocks(self, **kwargs) -> FourM:
        """``torch.compile`` every encoder and decoder block in place (one graph shared by all blocks
        of a kind); the data-dependent embedding and head code stays eager. Returns ``self``."""
        for block in [*self.encoder, *self.decoder]:
            block.compile(**kwargs)
        return self

    # ------------------------------------------------------------------ batch checks
    def _side(self, batch: Batch, side: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(tokens, model modality index, position, mask) of ``side`` ("input" | "target"), validated."""
        names = tuple(batch["modalities"])
        tokens, mod, pos, mask = (batch[f"{side}_{k}"] for k in ("tokens", "modality", "position", "mask"))
        mask = mask.bool()
        unknown = [n for n in names if n not in self.index]
        if unknown:
            raise ValueError(f"batch has modalities {unknown} that this model was not built for; "
                             f"the model knows {list(self.names)}")
        if bool(((mod < 0) | (mod >= len(names))).any()):
            raise ValueError(f"{side}_modality: indices outside [0, {len(names)}) of batch['modalities']")
        if names != self.names:  # batch indices -> this model's modality indices
            mod = torch.tensor([self.index[n] for n in names], device=mod.device)[mod]
        bad = mask & ((tokens < 0) | (tokens >= self.vocab_size[mod]) | (pos < 0) | (pos >= self.num_tokens[mod]))
        if bool(bad.any()):
            b, j = (int(v) for v in bad.nonzero()[0])
            m = int(mod[b, j])
            raise ValueError(f"{side} slot (object {b}, slot {j}) of modality {self.names[m]!r}: token "
                             f"{int(tokens[b, j])} at position {int(pos[b, j])}; expected token in "
                             f"[0, {int(self.vocab_size[m])}) and position in [0, {int(self.num_tokens[m])})")
        return tokens, mod, pos, mask

    # ------------------------------------------------------------------ model
    def _run(self, block: nn.Module, *args: Tensor) -> Tensor:
        if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _encode(self, tokens: Tensor, mod: Tensor, pos: Tensor, mask: Tensor) -> Tensor:
        rows = torch.where(mask, tokens + self.vocab_offset[mod], 0)
        x = self.token_emb(rows)
        if self.ordinal_emb is not None:
            x = x + self._ordinal_code(self.ordinal_place[rows]).to(x.dtype)
        x = x * mask[..., None].to(x.dtype)
        x = x + self.enc_modality_emb(mod) + self.enc_pos_emb[self.pos_offset[mod] + pos]
        keys = _key_mask(mask)
        for block in self.encoder:
            x = self._run(block, x, keys)
        return self.enc_norm(x)

    def _ordinal_code(self, place: Tensor) -> Tensor:
        """Linear map of [u, sin(pi k u), cos(pi k u)] (k = 1..F) for ordinal ids (u in (0, 1)); 0 for others."""
        k = torch.arange(1, self.cfg.ordinal_features + 1, device=place.device, dtype=torch.float32)
        u = place.float().clamp_min(0.0)[..., None]
        feats = torch.cat([u, torch.sin(math.pi * k * u), torch.cos(math.pi * k * u)], dim=-1)
        return self.ordinal_emb(feats.to(self.ordinal_emb.weight.dtype)) * (place >= 0)[..., None]

    def _decode(self, mod: Tensor, pos: Tensor, mask: Tensor, context: Tensor, context_mask: Tensor) -> Tensor:
        x = self.dec_modality_emb(mod) + self.dec_pos_emb[self.pos_offset[mod] + pos]
        keys, context_keys = _key_mask(mask), _key_mask(context_mask)
        for block in self.decoder:
            x = self._run(block, x, keys, context, context_keys)
        return self.dec_norm(x)

    def _group(self, mod: Tensor, mask: Tensor) -> tuple[Tensor, list[int]]:
        """Valid target slots sorted by modality (row-major within each), and the count per modality.

        One host sync per batch (the counts) instead of one boolean selection per modality.
        """
        key = torch.where(mask, mod, len(self.names)).flatten()
        order = torch.argsort(key, stable=True)
        counts = torch.bincount(key, minlength=len(self.names) + 1).tolist()
        return order[: sum(counts[:-1])], counts[:-1]

    def _heads(self, h: Tensor, order: Tensor, counts: list[int]) -> dict[str, Tensor]:
        parts = torch.split(h.flatten(0, 1)[order], counts)
        return {name: self.to_logits[name](part) for name, part in zip(self.names, parts, strict=True)}

    def encode(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Encoder output (B, N_in, dim), final norm applied, and its validity mask (B, N_in):
        the object embeddings for downstream use (e.g. a masked mean over valid slots)."""
        tokens, mod, pos, mask = self._side(batch, "input")
        return self._encode(tokens, mod, pos, mask), mask

    def logits_for(self, batch: Batch) -> dict[str, Tensor]:
        """{modality: logits (n_m, vocab_size_m)} for every modality of the model (n_m may be 0).

        Row k of modality m is the k-th valid target slot of m in row-major (object, slot) order,
        i.e. the slots of ``(target_mask & (target_modality == m)).nonzero()`` in batch indices.
        """
        return self._logits_and_targets(batch)[0]

    def _logits_and_targets(self, batch: Batch) -> tuple[dict[str, Tensor], tuple]:
        context, context_mask = self.encode(batch)
        target = self._side(batch, "target")
        _, mod, pos, mask = target
        order, counts = self._group(mod, mask)
        return self._heads(self._decode(mod, pos, mask, context, context_mask), order, counts), (*target, order, counts)

    def _token_ce(self, name: str, logits: Tensor, y: Tensor) -> Tensor:
        """Cross-entropy per target slot; for ordinal tokens with ``cfg.ordinal_sigma > 0`` against a
        Gaussian over the true bin's neighbours inside its ordinal range (truncated at 4 sigma)."""
        ranges = self.cfg.modalities[name].ordinal
        sigma = self.cfg.ordinal_sigma
        if not ranges or sigma <= 0 or y.numel() == 0:
            return F.cross_entropy(logits, y, reduction="none")
        ids = torch.arange(logits.shape[1], device=y.device)
        lo = torch.zeros_like(y)
        hi = torch.zeros_like(y)
        for a, b in ranges:
            inside = (y >= a) & (y < b)
            lo = torch.where(inside, a, lo)
            hi = torch.where(inside, b, hi)
        d = (ids[None, :] - y[:, None]).float()
        keep = (ids[None, :] >= lo[:, None]) & (ids[None, :] < hi[:, None]) & (d.abs() <= 4 * sigma)
        keep |= ids[None, :] == y[:, None]  # ids outside every range keep a one-hot target
        w = torch.exp(-0.5 * (d / sigma) ** 2) * keep
        q = w / w.sum(dim=1, keepdim=True)
        return -(q * F.log_softmax(logits, dim=-1)).sum(dim=1)

    def forward(self, batch: Batch) -> dict[str, Tensor | dict[str, Tensor]]:
        """Loss on a packed batch.

        Returns ``loss`` (scalar: per-modality mean cross-entropy, averaged over the modalities
        with targets in the batch; 0 if there are none), ``loss_per_modality`` {name: scalar} for
        those modalities, ``target_counts`` (n_modalities,) float targets per model modality
        (order ``self.names``), ``token_loss`` (B, N_target) float32 cross-entropy per target
        slot (0 at padding), and ``logits`` as from :meth:`logits_for`.
        """
        logits, (tokens, _, _, _, order, counts) = self._logits_and_targets(batch)
        labels = torch.split(tokens.flatten()[order], counts)
        ces = [self._token_ce(name, logits[name].float(), y) for name, y in zip(self.names, labels, strict=True)]
        token_loss = torch.zeros(tokens.numel(), dtype=torch.float32, device=tokens.device)
        token_loss[order] = torch.cat(ces)
        per_modality = {name: ce.mean() for name, ce, n in zip(self.names, ces, counts, strict=True) if n}
        # Heads of modalities without targets ran on empty inputs; their (zero) sums keep them in
        # the graph, so every parameter gets a gradient and DDP needs no find_unused_parameters.
        unused = sum((ce.sum() for ce, n in zip(ces, counts, strict=True) if not n), token_loss.new_zeros(()))
        loss = (torch.stack(list(per_modality.values())).mean() if per_modality else 0.0) + unused
        target_counts = torch.tensor(counts, dtype=torch.float32, device=tokens.device)
        return {"loss": loss, "loss_per_modality": per_modality, "target_counts": target_counts,
                "token_loss": token_loss.view(tokens.shape), "logits": logits}
