"""End-to-end fine-tuning of the FourM encoder with an attentive head, fully or with LoRA adapters.

:class:`FineTune` follows :class:`aion.evaluation.heads.Method`. The labelled objects are
tokenized once and turned into exactly the packed encoder batches inference builds
(``AionModel._inputs`` / ``_sample`` and :func:`aion.training.masking.collate`: same inputs,
same budget subsampling), so a fine-tuned model sees what the frozen probes see. Only the
encoder half of the network is copied and trained (the decoder is not needed to regress a
label); the caller's model is never modified.

- ``mode="full"``: every encoder parameter trains (small ``lr_encoder``) plus the head.
- ``mode="lora"``: the encoder is frozen and each ``nn.Linear`` of its blocks (attention q, kv,
  proj and MLP fc1, fc2) gets a low-rank update ``x A^T B^T * alpha / rank`` with ``A`` small
  random and ``B`` zero, so training starts from the pretrained function exactly; only the
  adapters and the head train.

Early stopping on val MSE (standardised target) restores the best weights; a seed fixes
initialisation and batch order.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from aion.evaluation.heads import (
    AttentivePool,
    Standardizer,
    TrainHistory,
    check_target,
    param_groups,
    resolve_input_set,
    seeded,
    split_val,
    tokenized_chunks,
    train_early_stopping,
)
from aion.evaluation.labelled import LabelledSet
from aion.inference.model import AionModel
from aion.model.fourm import FourM
from aion.training.masking import MaskedSample, collate, to_device

log = logging.getLogger(__name__)

EMBEDDING_PARAMS = ("token_emb", "enc_modality_emb", "enc_pos_emb")
"""Encoder tables excluded from weight decay: rows of modalities absent from the task get no
gradient and must not decay towards zero."""


class LoRALinear(nn.Module):
    """``base(x) + (x A^T) B^T * alpha / rank`` with the base layer frozen (Hu et al. 2021)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank: expected >= 1, got {rank}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # |A| <= 1/sqrt(in_features)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        self.scaling = float(alpha) / int(rank)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_a.t()) @ self.lora_b.t() * self.scaling


def add_lora(blocks: nn.Module, rank: int, alpha: float) -> list[str]:
    """Wrap every ``nn.Linear`` under ``blocks`` in :class:`LoRALinear` (in place); returns their names."""
    names = [n for n, m in blocks.named_modules() if isinstance(m, nn.Linear)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = blocks.get_submodule(parent_name) if parent_name else blocks
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    return names


def encoder_copy(model: FourM) -> FourM:
    """A float32 deep copy of ``model`` whose decoder modules are empty placeholders (never copied).

    :meth:`FourM.encode` only uses the embeddings, encoder blocks and final encoder norm, so
    the copy encodes exactly as the original does at half the memory.
    """
    skip: dict[int, object] = {id(model.decoder): nn.ModuleList(), id(model.to_logits): nn.ModuleDict(),
                               id(model.dec_norm): nn.Identity(), id(model.dec_modality_emb): nn.Identity(),
                               id(model.dec_pos_emb): nn.Parameter(torch.empty(0), requires_grad=False)}
    return copy.deepcopy(model, skip).float()


class _Regressor(nn.Module):
    def __init__(self, backbone: FourM, head: AttentivePool):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, batch: dict) -> Tensor:
        h, mask = self.backbone.encode(batch)
        return self.head(h, mask)


class FineTune:
    """Fine-tune the encoder (``mode="full"`` or ``"lora"``) with an :class:`AttentivePool` head.

    ``lr_encoder`` is the learning rate of the encoder (full) or of the adapters (LoRA);
    default 1e-4 and 1e-3. Budget: ``max_epochs`` (default 10) with ``patience`` 3 epochs,
    batch 32, one configuration (no learning-rate grid: each try is a full fine-tune); on small
    sets both are stretched so that the budget is at least ``min_steps`` optimizer steps (with 100
    labels, 10 epochs are only ~30 steps: far too few to move an encoder).
    """

    def __init__(self, am: AionModel, mode: Literal["full", "lora"] = "lora", rank: int = 8, alpha: float = 16.0,
                 lr_head: float = 1e-3, lr_encoder: float | None = None, weight_decay: float = 0.01,
                 batch_size: int = 32, max_epochs: int = 10, patience: int = 3, min_steps: int = 300,
                 n_queries: int = 1, heads: int = 4,
                 hidden: int | None = None, max_inputs: int | None = None, chunk_size: int = 512,
                 device: str | torch.device | None = None):
        if mode not in ("full", "lora"):
            raise ValueError(f"mode: expected 'full' or 'lora', got {mode!r}")
        if int(rank) < 1:
            raise ValueError(f"rank: expected >= 1, got {rank}")
        self.am, self.mode, self.rank, self.alpha = am, mode, int(rank), float(alpha)
        self.name = f"finetune_{mode}"
        self.lr_head = float(lr_head)
        self.lr_encoder = float(lr_encoder) if lr_encoder is not None else (1e-4 if mode == "full" else 1e-3)
        self.weight_decay, self.batch_size = float(weight_decay), int(batch_size)
        self.max_epochs, self.patience, self.min_steps = int(max_epochs), int(patience), int(min_steps)
        self.n_queries, self.heads, self.hidden = int(n_queries), int(heads), hidden
        self.max_inputs, self.chunk_size = max_inputs, int(chunk_size)
        self.device = torch.device(device) if device is not None else am.device
        self.net: _Regressor | None = None
        self.input_set: tuple[str, ...] | None = None
        self.scaler: Standardizer | None = None
        self.history: TrainHistory | None = None
        self.lora_layers: list[str] = []

    # ------------------------------------------------------------------ data
    def samples(self, data: LabelledSet) -> tuple[list[MaskedSample | None], dict[int, str]]:
        """One packed-batch entry per object (None where it cannot be read) and the per-object errors."""
        names = self.input_set
        out: list[MaskedSample | None] = [None] * len(data)
        errors: dict[int, str] = {}
        for start, _, tokens, present, tok_errors in tokenized_chunks(self.am, data, names, self.chunk_size, errors):
            inp = self.am._inputs(tokens, present, frozenset(), self.max_inputs, 0, "subsample")
            failed = {**inp.errors, **tok_errors}
            for b, msg in failed.items():
                errors[start + b] = msg
            for b in inp.ok():
                if b not in failed:
                    out[start + b] = self.am._sample(inp, b)
        return out, dict(sorted(errors.items()))

    def _batch(self, samples: Sequence[MaskedSample]) -> dict:
        return to_device(collate(list(samples), modalities=self.am.names), self.device)

    # ------------------------------------------------------------------ Method
    def fit(self, train: LabelledSet, val: LabelledSet, target: str, input_set: tuple[str, ...],
            seed: int = 0) -> FineTune:
        check_target(target, train, val)
        self.input_set = resolve_input_set(self.am, input_set)
        train, val = split_val(train, val, target, seed)
        st, _ = self.samples(train)
        sv, _ = self.samples(val)
        rt = [i for i, s in enumerate(st) if s is not None and np.isfinite(train.labels[target][i])]
        rv = [i for i, s in enumerate(sv) if s is not None and np.isfinite(val.labels[target][i])]
        if len(rt) < 2 or not rv:
            raise ValueError(f"target {target!r}, inputs {list(self.input_set)}: {len(rt)} training and {len(rv)} "
                             "validation rows have both a label and readable inputs")
        self.scaler = Standardizer.fit(train.labels[target][rt])
        yt = torch.from_numpy(self.scaler.forward(train.labels[target][rt])).float().to(self.device)
        yv = torch.from_numpy(self.scaler.forward(val.labels[target][rv])).float().to(self.device)
        train_samples = [st[i] for i in rt]
        step = 4 * self.batch_size
        val_batches = [self._batch([sv[i] for i in rv[s:s + step]]) for s in range(0, len(rv), step)]

        with seeded(seed):
            backbone = encoder_copy(self.am.model).to(self.device)
            if self.mode == "lora":
                backbone.requires_grad_(False)
                self.lora_layers = add_lora(backbone.encoder, self.rank, self.alpha)
            head = AttentivePool(backbone.cfg.dim, self.n_queries, self.heads, self.hidden).to(self.device)
            net = _Regressor(backbone, head)
        groups = (param_groups(backbone, self.lr_encoder, self.weight_decay, no_decay=EMBEDDING_PARAMS)
                  + param_groups(head, self.lr_head, self.weight_decay))

        def batch_loss(idx: np.ndarray) -> Tensor:
            pred = net(self._batch([train_samples[i] for i in idx]))
            return torch.mean((pred - yt[torch.from_numpy(idx).to(self.device)]) ** 2)

        def val_loss() -> float:
            with torch.no_grad():
                pred = torch.cat([net(b) for b in val_batches])
            return float(torch.mean((pred - yv) ** 2))

        per_epoch = math.ceil(len(train_samples) / self.batch_size)
        stretch = max(1, math.ceil(self.min_steps / (self.max_epochs * per_epoch))) if self.max_epochs > 0 else 1
        with seeded(seed):
            self.history = train_early_stopping(net, groups, batch_loss, len(train_samples), val_loss,
                                                max_epochs=self.max_epochs * stretch,
                                                patience=self.patience * stretch,
                                                batch_size=self.batch_size, seed=seed, lr=self.lr_encoder)
        self.net = net
        log.info("%s %s: best epoch %d of %d, val MSE %.4g (standardised), %d trainable parameters", self.name,
                 target, self.history.best_epoch, len(self.history.train_loss), self.history.best_val,
                 self.num_trainable())
        return self

    def num_trainable(self) -> int:
        return 0 if self.net is None else sum(p.numel() for p in self.net.parameters() if p.requires_grad)

    @torch.no_grad()
    def predict(self, data: LabelledSet) -> np.ndarray:
        if self.net is None:
            raise RuntimeError(f"{self.name}: call fit before predict")
        self.net.eval()
        samples, _ = self.samples(data)
        rows = [i for i, s in enumerate(samples) if s is not None]
        out = np.full(len(data), np.nan)
        step = 4 * self.batch_size
        preds = [self.net(self._batch([samples[i] for i in rows[s:s + step]])).double().cpu()
                 for s in range(0, len(rows), step)]
        if preds:
            out[rows] = self.scaler.inverse(torch.cat(preds).numpy())
        return out
