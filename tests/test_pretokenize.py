"""Pre-tokenization: presence masks follow the cross-match, shards are atomic and resumable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aion.data.mmu import iter_mmu_hdf5
from aion.mock.universe import MockConfig, generate
from aion.tokenizers.base import Tokenizer, register_tokenizer
from aion.tokenizers.pretokenize import PretokenizeConfig, load_token_shard, load_tokenizer_set, pretokenize


@register_tokenizer
class _CountTokenizer(Tokenizer):
    """Test codec: one token per object = number of valid pixels // step (a real, invertible-enough map)."""

    tokenizer_type = "test_count"

    def __init__(self, modality: str, step: int, fail_after: int | None = None):
        self.modality, self.step, self.fail_after, self.calls = modality, step, fail_after, 0

    @property
    def modalities(self):
        return (self.modality,)

    @property
    def num_tokens(self):
        return 2

    @property
    def vocab_size(self):
        return 4096

    def encode(self, batch):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        valid = batch.valid.reshape(len(batch), -1).sum(axis=1)
        return torch.as_tensor(np.stack([valid // self.step, np.zeros_like(valid)], axis=1)).long()

    def decode(self, tokens, **context):
        raise NotImplementedError("test tokenizer")

    def get_config(self):
        return {"modality": self.modality, "step": self.step}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def state_tensors(self):
        return {"step": torch.tensor([self.step])}

    def load_state_tensors(self, tensors):
        self.step = int(tensors["step"][0])


@pytest.fixture(scope="module")
def universe(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mock_tok")
    generate(out, MockConfig(n=200, seed=3, image_size=16, hsc_image_size=24, chunk_size=64), progress=False)
    return out


def _toks(fail_after=None):
    return {"desi_spectrum": _CountTokenizer("desi_spectrum", 10, fail_after),
            "legacysurvey_image": _CountTokenizer("legacysurvey_image", 4)}


def test_presence_follows_the_crossmatch_and_tokens_match_the_data(universe, tmp_path):
    cfg = PretokenizeConfig(shard_size=64, batch_size=32, join=("desi", "hsc"))
    index = pretokenize(universe, _toks(), tmp_path / "tok", cfg, progress=False)
    assert index["n_objects"] == 200 and [s["n"] for s in index["shards"]] == [64, 64, 64, 8]
    shards = [load_token_shard(tmp_path / "tok" / s["name"]) for s in index["shards"]]
    ids = np.concatenate([s["object_id"] for s in shards])
    present = np.concatenate([s["desi_spectrum.present"] for s in shards])
    tokens = np.concatenate([s["desi_spectrum"] for s in shards])
    truth = next(iter_mmu_hdf5(universe, "truth", batch_size=1000, columns=["desi_object_id"]))
    np.testing.assert_array_equal(ids, truth.object_id)
    np.testing.assert_array_equal(present, truth.columns["desi_object_id"] >= 0)
    assert index["modalities"]["desi_spectrum"]["present"] == present.sum() > 0
    desi = next(iter_mmu_hdf5(universe, "desi", batch_size=1000))
    row = {int(d): i for i, d in enumerate(truth.columns["desi_object_id"]) if d >= 0}
    expect = desi.modalities["desi_spectrum"].valid.sum(axis=1) // 10
    got = tokens[[row[int(d)] for d in desi.object_id], 0]
    np.testing.assert_array_equal(got, expect)
    assert np.all(tokens[~present] == 0)
    img_present = np.concatenate([s["legacysurvey_image.present"] for s in shards])
    assert img_present.all()


def test_interrupted_run_resumes_to_identical_shards(universe, tmp_path):
    cfg = PretokenizeConfig(shard_size=64, batch_size=32, join=("desi",))
    ref = pretokenize(universe, _toks(), tmp_path / "ref", cfg, progress=False)
    with pytest.raises(KeyboardInterrupt):
        pretokenize(universe, _toks(fail_after=3), tmp_path / "run", cfg, progress=False)
    done = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("shard_"))
    assert done == ["shard_00000"]  # only complete shards exist, no temporary leftovers
    assert not any(p.name.startswith(".") for p in (tmp_path / "run").iterdir())
    resumed = pretokenize(universe, _toks(), tmp_path / "run", cfg, progress=False)
    assert resumed == ref
    for s in ref["shards"]:
        for f in (tmp_path / "ref" / s["name"]).iterdir():
            assert f.read_bytes() == (tmp_path / "run" / s["name"] / f.name).read_bytes()
    with pytest.raises(ValueError, match="another configuration"):
        pretokenize(universe, _toks(), tmp_path / "run", PretokenizeConfig(shard_size=32, join=("desi",)),
                    progress=False)


def test_tokenizer_set_round_trip_and_conflicts(tmp_path):
    _CountTokenizer("desi_spectrum", 7).save_pretrained(tmp_path / "set" / "spec")
    loaded = load_tokenizer_set(tmp_path / "set")
    assert list(loaded) == ["desi_spectrum"] and loaded["desi_spectrum"].step == 7
    cfg = json.loads((tmp_path / "set" / "spec" / "config.json").read_text())
    assert cfg["tokenizer_type"] == "test_count"
    _CountTokenizer("desi_spectrum", 9).save_pretrained(tmp_path / "set" / "spec2")
    with pytest.raises(ValueError, match="two tokenizers"):
        load_tokenizer_set(tmp_path / "set")
    with pytest.raises(FileNotFoundError, match="no saved tokenizers"):
        load_tokenizer_set(tmp_path / "empty_dir_that_is_missing")
