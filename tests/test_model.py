"""The 4M-style model: sizes of the presets, learning, padding invariance, loss averaging, errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from aion.config import from_dict, to_dict
from aion.model import FourM, ModalitySpec, ModelConfig, build_config, modality_specs_from_index, preset
from aion.training.synthetic import realistic_table

torch.set_num_threads(1)


def meta_count(name: str, table: dict[str, ModalitySpec]) -> int:
    with torch.device("meta"):
        return FourM(preset(name, table)).num_parameters()


def test_preset_sizes_match_aion1():
    table = realistic_table()
    assert len(table) == 29
    assert 250e6 <= meta_count("base", table) <= 350e6
    assert 700e6 <= meta_count("large", table) <= 900e6
    assert 2.5e9 <= meta_count("xlarge", table) <= 3.5e9


def test_meta_count_equals_real_count():
    table = {"a": ModalitySpec(num_tokens=5, vocab_size=7), "b": ModalitySpec(num_tokens=1, vocab_size=3)}
    real = FourM(preset("tiny", table))
    assert real.num_parameters() == meta_count("tiny", table)
    assert real.num_parameters(exclude_embeddings=True) < real.num_parameters()


# ---------------------------------------------------------------------------- batches by hand
def make_batch(objects: list[dict], names: tuple[str, ...]) -> dict:
    """objects: [{"inputs": [(name, pos, token)...], "targets": [...]}] -> packed batch."""
    batch = {"modalities": names}
    for side in ("input", "target"):
        rows = [o[side + "s"] for o in objects]
        width = max(1, max(len(r) for r in rows))
        t = torch.zeros(len(rows), width, dtype=torch.long)
        m, p = torch.zeros_like(t), torch.zeros_like(t)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for b, r in enumerate(rows):
            for j, (name, pos, tok) in enumerate(r):
                t[b, j], m[b, j], p[b, j], mask[b, j] = tok, names.index(name), pos, True
        batch.update({f"{side}_tokens": t, f"{side}_modality": m, f"{side}_position": p, f"{side}_mask": mask,
                      f"num_{side}s": mask.sum(1)})
    return batch


TABLE = {"a": ModalitySpec(num_tokens=8, vocab_size=16), "b": ModalitySpec(num_tokens=8, vocab_size=16),
         "c": ModalitySpec(num_tokens=1, vocab_size=5)}


def tiny(seed: int = 0, **overrides) -> FourM:
    torch.manual_seed(seed)
    return FourM(preset("tiny", TABLE, **overrides))


def test_learns_a_cross_modal_map():
    """b[p] = (5 a[p] + p) mod 16 over 4 positions: predictable from the inputs only by matching
    the decoder's position queries to the encoder's positions through cross-attention."""
    table = {"a": ModalitySpec(num_tokens=4, vocab_size=16), "b": ModalitySpec(num_tokens=4, vocab_size=16)}
    torch.manual_seed(0)
    model = FourM(preset("tiny", table))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    pos = torch.arange(4).expand(64, 4)
    ones = torch.ones(64, 4, dtype=torch.bool)

    losses = []
    for _ in range(150):
        a = torch.randint(0, 16, (64, 4))
        batch = {"modalities": ("a", "b"), "input_tokens": a, "input_modality": torch.zeros_like(a),
                 "input_position": pos, "input_mask": ones, "target_tokens": (5 * a + pos) % 16,
                 "target_modality": torch.ones_like(a), "target_position": pos, "target_mask": ones}
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)  # seeds 0-3 reach 0.1-0.3 from 2.8


def test_padding_invariance():
    model = tiny().eval()
    alone = {"inputs": [("a", 0, 3), ("a", 5, 9), ("c", 0, 2)], "targets": [("b", 1, 4), ("b", 7, 15)]}
    longer = {"inputs": [("a", p, p + 1) for p in range(8)] + [("b", p, 2 * p) for p in range(6)],
              "targets": [("b", 6, 1), ("b", 7, 2), ("c", 0, 4), ("a", 3, 0)]}
    with torch.no_grad():
        one = model(make_batch([alone], ("a", "b", "c")))
        two = model(make_batch([alone, longer], ("a", "b", "c")))
        two_rev = model(make_batch([longer, alone], ("a", "b", "c")))
    torch.testing.assert_close(two["logits"]["b"][:2], one["logits"]["b"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(two["token_loss"][0, :2], one["token_loss"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(two_rev["token_loss"][1, :2], one["token_loss"][0], atol=1e-5, rtol=1e-5)
    assert (two["token_loss"][0, 2:] == 0).all()  # padded targets carry no loss


def test_loss_is_mean_over_modalities_of_mean_over_tokens():
    model = tiny()
    objects = [{"inputs": [("b", 0, 1)], "targets": [("a", 0, 1), ("a", 1, 2), ("a", 2, 3), ("c", 0, 4)]},
               {"inputs": [("a", 4, 5), ("c", 0, 1)], "targets": [("a", 3, 7)]}]
    batch = make_batch(objects, ("a", "b", "c"))
    out = model(batch)
    logits = model.logits_for(batch)
    assert logits["a"].shape == (4, 16) and logits["c"].shape == (1, 5) and logits["b"].shape == (0, 16)
    ce_a = F.cross_entropy(logits["a"], torch.tensor([1, 2, 3, 7]), reduction="none")
    ce_c = F.cross_entropy(logits["c"], torch.tensor([4]), reduction="none")
    expected = (ce_a.mean() + ce_c.mean()) / 2  # b has no targets: not in the average
    torch.testing.assert_close(out["loss"], expected)
    assert set(out["loss_per_modality"]) == {"a", "c"}
    torch.testing.assert_close(out["loss_per_modality"]["a"], ce_a.mean())
    assert not torch.isclose(out["loss"], torch.cat([ce_a, ce_c]).mean())  # not the token mean
    assert out["target_counts"].tolist() == [4.0, 0.0, 1.0]


def test_every_parameter_gets_a_gradient_even_for_absent_modalities():
    model = tiny()
    out = model(make_batch([{"inputs": [("a", 0, 1)], "targets": [("a", 1, 2)]}], ("a",)))
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_batch_modality_list_is_remapped_by_name():
    model = tiny().eval()
    obj = {"inputs": [("b", 2, 5), ("b", 3, 1)], "targets": [("a", 1, 4)]}
    with torch.no_grad():
        losses = [model(make_batch([obj], names))["loss"] for names in (("a", "b", "c"), ("b", "a"), ("a", "b"))]
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(losses[0], losses[2])


def test_encode_shapes_and_targets_without_inputs_stay_finite():
    model = tiny().eval()
    batch = make_batch([{"inputs": [("a", 0, 1), ("a", 1, 2)], "targets": [("b", 0, 3)]},
                        {"inputs": [], "targets": [("b", 1, 3)]}], ("a", "b", "c"))
    enc, mask = model.encode(batch)
    assert enc.shape == (2, 2, 64) and mask.tolist() == [[True, True], [False, False]]
    assert torch.isfinite(model(batch)["loss"])


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    obj = {"inputs": [("a", p, p) for p in range(5)], "targets": [("b", 0, 1), ("c", 0, 2)]}
    batch = make_batch([obj, obj], ("a", "b", "c"))
    grads = []
    for ckpt in (False, True):
        model = tiny(activation_checkpointing=ckpt).train()
        loss = model(batch)["loss"]
        loss.backward()
        grads.append((loss.detach(), model.encoder[0].attn.q.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


# ---------------------------------------------------------------------------- errors
def test_unknown_modality_is_named():
    model = tiny()
    with pytest.raises(ValueError, match="zzz"):
        model(make_batch([{"inputs": [("zzz", 0, 1)], "targets": [("a", 0, 1)]}], ("a", "zzz")))


@pytest.mark.parametrize("side, slot, match", [
    ("inputs", ("a", 0, 16), r"input .*'a'.*token 16.*\[0, 16\)"),
    ("inputs", ("c", 0, -1), r"input .*'c'.*token -1"),
    ("targets", ("c", 0, 5), r"target .*'c'.*token 5.*\[0, 5\)"),
    ("targets", ("b", 8, 0), r"target .*'b'.*position 8.*\[0, 8\)"),
])
def test_out_of_range_tokens_and_positions_are_clear_errors(side, slot, match):
    obj = {"inputs": [("a", 1, 1)], "targets": [("b", 0, 1)]}
    obj[side] = obj[side] + [slot]
    with pytest.raises(ValueError, match=match):
        tiny()(make_batch([obj], ("a", "b", "c")))


# ---------------------------------------------------------------------------- configuration
def test_config_from_dicts_with_unknown_key_errors(tmp_path):
    cfg = preset("small", TABLE, dropout=0.1)
    assert (cfg.dim, cfg.encoder_depth, cfg.heads, cfg.dropout) == (256, 4, 4, 0.1)
    again = from_dict(ModelConfig, json.loads(json.dumps(to_dict(cfg))))
    assert again == cfg and isinstance(again.modalities["a"], ModalitySpec)
    with pytest.raises(ValueError, match="bogus"):
        build_config({"preset": "tiny", "bogus": 1}, TABLE)
    with pytest.raises(ValueError, match=r"modalities\.a.*extra"):
        from_dict(ModelConfig, {**to_dict(cfg), "modalities": {"a": {"num_tokens": 1, "vocab_size": 2, "extra": 3}}})
    with pytest.raises(ValueError, match="must not be set"):
        build_config({"preset": "tiny", "modalities": {}}, TABLE)
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge", TABLE)
    with pytest.raises(ValueError, match="multiple of heads"):
        build_config({"dim": 30, "encoder_depth": 1, "decoder_depth": 1, "heads": 4}, TABLE)
    assert build_config({"dim": 32, "encoder_depth": 1, "decoder_depth": 1, "heads": 4}, TABLE).dim == 32

    index = {"modalities": {"x": {"num_tokens": 3, "vocab_size": 9, "survey": "s", "present": 1, "role": "input"}}}
    (tmp_path / "index.json").write_text(json.dumps(index))
    assert modality_specs_from_index(tmp_path) == {"x": ModalitySpec(num_tokens=3, vocab_size=9)}
    with pytest.raises(ValueError, match="'y'"):
        modality_specs_from_index(index, ["y"])


def test_ordinal_soft_targets_reward_near_misses_and_stay_in_their_range():
    from aion.model import ModalitySpec, preset

    spec = {"z": ModalitySpec(num_tokens=2, vocab_size=20, ordinal=((0, 16), (16, 20))),
            "img": ModalitySpec(num_tokens=4, vocab_size=8)}
    plain = FourM(preset("tiny", spec, dim=16))
    soft = FourM(preset("tiny", spec, dim=16, ordinal_sigma=2.0))
    y = torch.tensor([5, 15, 17])
    logits = torch.randn(3, 20)
    assert torch.allclose(plain._token_ce("z", logits, y), torch.nn.functional.cross_entropy(logits, y,
                                                                                             reduction="none"))
    assert torch.allclose(soft._token_ce("img", logits[:, :8], y % 8),
                          torch.nn.functional.cross_entropy(logits[:, :8], y % 8, reduction="none"))
    # a prediction peaked one bin off scores better than one peaked eight bins off (plain CE: equal)
    near, far = torch.full((1, 20), -10.0), torch.full((1, 20), -10.0)
    near[0, 6], far[0, 13] = 10.0, 10.0
    t = torch.tensor([5])
    assert soft._token_ce("z", near, t) < soft._token_ce("z", far, t) - 2
    assert torch.allclose(plain._token_ce("z", near, t), plain._token_ce("z", far, t))
    # the target never leaks across the coarse / fine boundary: mass beyond id 15 costs nothing extra
    edge = torch.full((1, 20), -10.0)
    edge[0, 14:16] = 10.0
    inside = soft._token_ce("z", edge, torch.tensor([15]))
    edge[0, 16] = 10.0  # also put mass on the first fine id
    assert soft._token_ce("z", edge, torch.tensor([15])) > inside
    with pytest.raises(ValueError, match="ordinal range"):
        ModalitySpec(num_tokens=1, vocab_size=10, ordinal=((0, 11),))


def test_ordinal_code_makes_neighbouring_scalar_bins_alike():
    from aion.model import ModalitySpec, preset

    spec = {"z": ModalitySpec(num_tokens=1, vocab_size=64, ordinal=((0, 64),)),
            "img": ModalitySpec(num_tokens=4, vocab_size=64)}
    torch.manual_seed(0)
    model = FourM(preset("tiny", spec, dim=32, ordinal_features=8))
    ids = torch.arange(64)

    def rows(name):
        off = model.vocab_offset[model.index[name]]
        emb = model.token_emb(ids + off)
        return emb + model._ordinal_code(model.ordinal_place[ids + off])

    z, img = rows("z"), rows("img")
    cos = torch.nn.functional.cosine_similarity
    near, far = cos(z[:-1], z[1:]).mean(), cos(z[:8], z[-8:]).mean()
    assert near > 0.75 and near > far + 0.3, (near, far)  # neighbours alike, far bins not
    assert cos(img[:-1], img[1:]).mean().abs() < 0.3  # codebook ids keep independent embeddings
    assert torch.equal(model._ordinal_code(model.ordinal_place[ids + model.vocab_offset[model.index["img"]]]),
                       torch.zeros(64, 32))
    plain = FourM(preset("tiny", spec, dim=32))
    assert plain.ordinal_emb is None and model.num_parameters(True) == plain.num_parameters(True)


def test_ordinal_options_without_ordinal_ranges_fail_loudly():
    from aion.model import ModalitySpec, preset

    spec = {"img": ModalitySpec(num_tokens=4, vocab_size=8)}
    for kw in ({"ordinal_features": 4}, {"ordinal_sigma": 2.0}):
        with pytest.raises(ValueError, match="re-run `aion tokenize`"):
            FourM(preset("tiny", spec, dim=16, **kw))
