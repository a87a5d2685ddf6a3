"""Masking sampler, packing and token-shard datasets: budgets, presence, disjointness, determinism."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from aion.config import from_dict
from aion.model import FourM, ModalitySpec, preset
from aion.training import (
    MaskedDataset,
    MaskedSample,
    MaskingConfig,
    MaskingSampler,
    TokenShardDataset,
    collate,
    split_budget,
)

torch.set_num_threads(1)

# provabgs_z is a registered label modality: a target, never an input.
SIZES = {"img": 64, "spec": 20, "s1": 1, "s2": 2, "s3": 1, "s4": 2, "provabgs_z": 1}


def random_object(rng: np.random.Generator) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    tokens = {n: torch.from_numpy(rng.integers(0, 50, n_tok)) for n, n_tok in SIZES.items()}
    present = {n: bool(rng.random() < 0.6) for n in SIZES}
    return tokens, present


def check_sample(s: MaskedSample, tokens, present, cfg: MaskingConfig) -> None:
    assert s.num_inputs <= cfg.input_budget and s.num_targets <= cfg.target_budget
    for side in (s.inputs, s.targets):
        for name, pos in side.items():
            assert present[name], f"absent modality {name} sampled"
            assert len(pos) > 0 and pos.dtype == np.int64
            assert (np.diff(pos) > 0).all() and 0 <= pos.min() and pos.max() < SIZES[name]
            np.testing.assert_array_equal(s.tokens[name], tokens[name].numpy())
    assert "provabgs_z" not in s.inputs
    for name in set(s.inputs) & set(s.targets):
        assert not set(s.inputs[name].tolist()) & set(s.targets[name].tolist()), "inputs and targets overlap"
    assert set(s.tokens) == set(s.inputs) | set(s.targets)


@pytest.mark.parametrize("strategy", ["aion", "dirichlet"])
def test_budgets_presence_disjointness_over_many_objects(strategy):
    rng = np.random.default_rng(0)
    for trial in range(400):
        cfg = MaskingConfig(strategy=strategy, input_budget=int(rng.integers(1, 80)),
                            target_budget=int(rng.integers(1, 60)))
        tokens, present = random_object(rng)
        s = MaskingSampler(cfg)(tokens, present, trial)
        check_sample(s, tokens, present, cfg)
        n_input_ok = sum(SIZES[n] for n in SIZES if present[n] and n != "provabgs_z")
        n_all = sum(SIZES[n] for n in SIZES if present[n])
        # dirichlet uses the input budget whenever the tokens exist; aion fills it when it binds and
        # otherwise keeps some tokens back; targets come from what is left.
        if strategy == "dirichlet":
            assert s.num_inputs == min(cfg.input_budget, n_input_ok)
        else:
            assert (1 if n_input_ok else 0) <= s.num_inputs <= min(cfg.input_budget, n_input_ok)
            if s.num_inputs < cfg.input_budget and n_input_ok > 1:
                # the budget did not bind: some readable token is always kept back to be predicted
                assert s.num_inputs < n_input_ok
        left = n_all - s.num_inputs
        if s.num_inputs == 0:
            assert s.num_targets == 0
        elif strategy == "dirichlet":
            assert s.num_targets == min(cfg.target_budget, left)
        else:
            assert (1 if left else 0) <= s.num_targets <= min(cfg.target_budget, left)


@pytest.mark.parametrize("strategy", ["aion", "dirichlet"])
def test_same_seed_same_draw_and_generators(strategy):
    rng = np.random.default_rng(1)
    tokens, _ = random_object(rng)
    present = {n: True for n in SIZES}
    sampler = MaskingSampler(MaskingConfig(strategy=strategy, input_budget=30, target_budget=20))

    def key(s):
        return ({n: p.tolist() for n, p in s.inputs.items()}, {n: p.tolist() for n, p in s.targets.items()})

    assert key(sampler(tokens, present, 7)) == key(sampler(tokens, present, 7))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert [key(sampler(tokens, present, g1)) for _ in range(3)] == [key(sampler(tokens, present, g2))
                                                                     for _ in range(3)]
    draws = {json.dumps(key(sampler(tokens, present, seed))) for seed in range(20)}
    assert len(draws) > 15


def test_aion_anchor_and_skewed_per_modality_targets():
    sampler = MaskingSampler(MaskingConfig(strategy="aion", input_budget=40, target_budget=40))
    tokens = {n: torch.zeros(k, dtype=torch.long) for n, k in SIZES.items()}
    present = {n: True for n in SIZES}
    img_share, full, single_modality, scalar_free, scalar_target = [], 0, 0, 0, 0
    for seed in range(400):
        s = sampler(tokens, present, seed)
        left_img = SIZES["img"] - len(s.inputs.get("img", ()))
        if left_img >= 40:
            img_share.append(len(s.targets.get("img", ())) / left_img)
        small = MaskingSampler(MaskingConfig(strategy="aion", input_budget=40, target_budget=10))(tokens, present, seed)
        full += small.num_targets == min(10, sum(SIZES.values()) - small.num_inputs)
        single_modality += len(s.inputs) == 1
        # a 1-token scalar not used as input asks for its one token; only the budget can refuse it
        scalar_free += "s1" not in s.inputs
        scalar_target += "s1" not in s.inputs and "s1" in s.targets
    # per-modality fractions ~ Beta(0.5, 2): mean 0.2, mostly small
    assert 0.08 < np.mean(img_share) < 0.32 and np.median(img_share) < 0.2
    # once the asks add up to more than the budget (the usual case with 576-token images), it is used in full
    assert full > 150
    assert scalar_target > 0.7 * scalar_free
    # A large anchor draw (e.g. 40 image tokens) fills the budget alone now and then.
    assert single_modality > 0


def test_dirichlet_split_often_concentrates_with_small_alpha():
    sampler = MaskingSampler(MaskingConfig(strategy="dirichlet", input_budget=20, target_budget=20,
                                           dirichlet_alpha=0.2))
    tokens = {"x": torch.zeros(40, dtype=torch.long), "y": torch.zeros(40, dtype=torch.long)}
    present = {"x": True, "y": True}
    one_sided = sum(len(sampler(tokens, present, seed).inputs) == 1 for seed in range(200))
    assert one_sided > 40


def test_label_only_and_empty_objects_give_nothing():
    sampler = MaskingSampler(MaskingConfig())
    tokens = {"provabgs_z": torch.tensor([4]), "img": torch.arange(4)}
    s = sampler(tokens, {"provabgs_z": True, "img": False}, 0)
    assert s.num_inputs == s.num_targets == 0 and s.tokens == {}
    custom = MaskingSampler(MaskingConfig(never_input=("img",)))
    s = custom(tokens, {"provabgs_z": True, "img": True}, 0)
    assert set(s.inputs) == {"provabgs_z"} and set(s.targets) <= {"img"}


def test_split_budget():
    caps = np.array([3, 100, 0, 5])
    for seed in range(50):
        w = np.random.default_rng(seed).dirichlet(np.ones(4))
        c = split_budget(20, w, caps)
        assert c.sum() == 20 and (c <= caps).all() and (c >= 0).all()
    assert split_budget(200, np.ones(4), caps).tolist() == [3, 100, 0, 5]
    assert split_budget(10, np.array([1.0, 0.0, 0.0, 0.0]), caps).tolist() == [3, 4, 0, 3]
    assert split_budget(4, np.zeros(4), np.array([10, 10, 10, 10])).tolist() == [1, 1, 1, 1]


def test_config_errors():
    with pytest.raises(ValueError, match="strategy"):
        MaskingConfig(strategy="uniform")
    with pytest.raises(ValueError, match="budget"):
        MaskingConfig(input_budget=0)
    with pytest.raises(ValueError, match="unknown key"):
        from_dict(MaskingConfig, {"strategy": "aion", "budget": 3})
    assert from_dict(MaskingConfig, {"target_beta": [1, 3]}).target_beta == (1.0, 3.0)
    with pytest.raises(KeyError, match="'img' is marked present"):
        MaskingSampler()({}, {"img": True}, 0)


# ---------------------------------------------------------------------------- collate
def test_collate_packs_exactly_what_was_sampled():
    rng = np.random.default_rng(5)
    sampler = MaskingSampler(MaskingConfig(strategy="dirichlet", input_budget=25, target_budget=10))
    samples = []
    while len(samples) < 6:
        tokens, present = random_object(rng)
        samples.append(sampler(tokens, present, len(samples)))
    names = ("img", "provabgs_z", "s1", "s2", "s3", "s4", "spec", "unused")
    batch = collate(samples, modalities=reversed(names))
    assert batch["modalities"] == names
    for side, key in (("input", "inputs"), ("target", "targets")):
        counts = [getattr(s, f"num_{key}") for s in samples]
        assert batch[f"{side}_tokens"].shape == (6, max(1, max(counts)))
        assert batch[f"num_{side}s"].tolist() == counts
        assert batch[f"{side}_mask"].sum(1).tolist() == counts
        for b, s in enumerate(samples):
            got = {}
            for j in range(counts[b]):
                name = names[int(batch[f"{side}_modality"][b, j])]
                p = int(batch[f"{side}_position"][b, j])
                assert int(batch[f"{side}_tokens"][b, j]) == s.tokens[name][p]
                got.setdefault(name, []).append(p)
            assert got == {n: p.tolist() for n, p in getattr(s, key).items()}
            assert not batch[f"{side}_mask"][b, counts[b]:].any()
    assert collate(samples)["modalities"] == tuple(sorted(set().union(*(s.tokens for s in samples))))
    with pytest.raises(ValueError, match="not in the given list"):
        collate(samples, modalities=["img"])


# ---------------------------------------------------------------------------- shard dataset
MODS = {"legacysurvey_flux_g": (2, 1056, "legacysurvey", "input"), "desi_z": (2, 1088, "desi", "input"),
        "provabgs_z": (1, 1024, "provabgs", "label")}


def write_root(root, sizes=(3, 2), seed=0):
    """A pre-tokenized root in the layout (and index keys) of aion.tokenizers.pretokenize."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    shards, counts, everything, start = [], dict.fromkeys(MODS, 0), [], 0
    for k, n in enumerate(sizes):
        d = root / f"shard_{k:05d}"
        d.mkdir()
        np.save(d / "object_id.npy", np.arange(start, start + n, dtype=np.int64) + 1000)
        objects = [{} for _ in range(n)]
        for name, (num_tokens, vocab, _, _) in MODS.items():
            tokens = rng.integers(0, vocab, (n, num_tokens)).astype(np.int32)
            present = rng.random(n) < 0.7
            tokens[~present] = 0
            np.save(d / f"{name}.npy", tokens)
            np.save(d / f"{name}.present.npy", present)
            counts[name] += int(present.sum())
            for i in range(n):
                objects[i][name] = (tokens[i], bool(present[i]))
        everything += objects
        shards.append({"name": d.name, "n": n})
        start += n
    index = {"n_objects": start, "parent": "legacysurvey", "shards": shards, "joins": {},
             "modalities": {name: {"num_tokens": t, "vocab_size": v, "survey": s, "present": counts[name], "role": r}
                            for name, (t, v, s, r) in sorted(MODS.items())}}
    (root / "index.json").write_text(json.dumps(index, indent=2))
    return everything


def test_token_shard_dataset_reads_across_shards(tmp_path):
    truth = write_root(tmp_path / "tok")
    ds = TokenShardDataset(tmp_path / "tok")
    assert len(ds) == 5 and ds.modalities == tuple(sorted(MODS))
    for i in range(5):
        item = ds[i]
        assert item["object_id"] == 1000 + i
        for name in MODS:
            assert item["tokens"][name].dtype == torch.int64
            np.testing.assert_array_equal(item["tokens"][name].numpy(), truth[i][name][0])
            assert item["present"][name] == truth[i][name][1]
    assert ds[-1]["object_id"] == 1004
    with pytest.raises(IndexError):
        ds[5]
    assert ds.specs() == {"desi_z": ModalitySpec(num_tokens=2, vocab_size=1088),
                          "legacysurvey_flux_g": ModalitySpec(num_tokens=2, vocab_size=1056),
                          "provabgs_z": ModalitySpec(num_tokens=1, vocab_size=1024)}
    assert ds.label_modalities() == ("provabgs_z",)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._open == {} and clone[3]["object_id"] == 1003
    sub = TokenShardDataset(tmp_path / "tok", modalities=["desi_z"])
    assert set(sub[0]["tokens"]) == {"desi_z"}
    with pytest.raises(ValueError, match="nope"):
        TokenShardDataset(tmp_path / "tok", modalities=["nope"])
    with pytest.raises(FileNotFoundError, match="index.json"):
        TokenShardDataset(tmp_path)


def test_token_shard_dataset_checks_shapes_against_index(tmp_path):
    write_root(tmp_path / "tok")
    np.save(tmp_path / "tok" / "shard_00001" / "desi_z.npy", np.zeros((2, 3), dtype=np.int32))
    ds = TokenShardDataset(tmp_path / "tok")
    ds[0]
    with pytest.raises(ValueError, match="desi_z"):
        ds[4]


def test_masked_dataset_to_model_end_to_end(tmp_path):
    write_root(tmp_path / "tok", sizes=(7, 5))
    base = TokenShardDataset(tmp_path / "tok")
    sampler = MaskingSampler(MaskingConfig(strategy="aion", input_budget=4, target_budget=3, seed=11))
    ds = MaskedDataset(base, sampler)
    first = [ds[i] for i in range(len(ds))]
    again = [ds[i] for i in range(len(ds))]
    assert all(a.inputs.keys() == b.inputs.keys() and all((a.inputs[k] == b.inputs[k]).all() for k in a.inputs)
               for a, b in zip(first, again, strict=True))
    ds.set_epoch(1)
    assert any(json.dumps({k: v.tolist() for k, v in a.targets.items()})
               != json.dumps({k: v.tolist() for k, v in ds[i].targets.items()}) for i, a in enumerate(first))
    for i, s in enumerate(first):
        item = base[i]
        check = {n: torch.as_tensor(item["tokens"][n]) for n in MODS}
        for name in s.tokens:
            assert item["present"][name]
            np.testing.assert_array_equal(s.tokens[name], check[name].numpy())
        assert "provabgs_z" not in s.inputs and s.object_id == item["object_id"]

    torch.manual_seed(0)
    model = FourM(preset("tiny", base.specs()))
    loader = DataLoader(ds, batch_size=4, collate_fn=collate)
    for batch in loader:
        out = model(batch)
        assert torch.isfinite(out["loss"])
        assert set(out["loss_per_modality"]) <= set(MODS)


def test_aion_small_objects_keep_tokens_to_predict():
    """An object with fewer tokens than the input budget must not have them all read as inputs
    (that would leave no target, wasting it): a share of the other modalities stays back."""
    sizes = {"img": 16, "s1": 1, "s2": 2, "s3": 2}
    sampler = MaskingSampler(MaskingConfig(strategy="aion", input_budget=128, target_budget=64))
    tokens = {n: torch.zeros(k, dtype=torch.long) for n, k in sizes.items()}
    n_targets, n_inputs = [], []
    for seed in range(300):
        s = sampler(tokens, dict.fromkeys(sizes, True), seed)
        n_targets.append(s.num_targets)
        n_inputs.append(s.num_inputs)
        assert s.num_inputs + s.num_targets <= sum(sizes.values())
    n_targets = np.array(n_targets)
    assert (n_targets > 0).all()  # every object trains the decoder
    assert np.mean(n_targets) > 3 and np.mean(n_inputs) > 5
    # a lone modality keeps at least one token back as a target
    lone = sampler({"img": torch.zeros(16, dtype=torch.long)}, {"img": True}, 0)
    assert lone.num_targets >= 1 and lone.num_inputs <= 15
    # when the budget binds, it is still filled exactly as AION-1 does
    big = {"img": 300, "s1": 1}
    s = sampler({n: torch.zeros(k, dtype=torch.long) for n, k in big.items()}, dict.fromkeys(big, True), 3)
    assert s.num_inputs == 128
