"""`aion tokenizer train|eval` and `aion tokenize` end to end on a small mock universe (scalar recipe)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from aion.cli import main
from aion.mock.universe import MockConfig, generate
from aion.tokenizers.image import load_recipe as load_image_recipe
from aion.tokenizers.pretokenize import load_token_shard
from aion.tokenizers.recipes import recipe_kind

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mocks(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    cfg = dict(n=300, image_size=16, hsc_image_size=24, chunk_size=128)
    generate(root / "train", MockConfig(seed=11, **cfg), progress=False)
    generate(root / "eval", MockConfig(seed=12, **cfg), progress=False)
    return root / "train", root / "eval"


def test_shipped_recipes_declare_their_kind():
    kinds = {p.name: recipe_kind(p) for p in sorted((REPO / "tokenizers").glob("*.yaml"))}
    assert kinds == {"image_aion.yaml": "image", "image_cpu.yaml": "image", "image_quick.yaml": "image",
                     "scalars.yaml": "scalar", "spectrum_aion.yaml": "spectrum", "spectrum_cpu.yaml": "spectrum",
                     "spectrum_quick.yaml": "spectrum"}


def test_a_recipe_handed_to_the_wrong_trainer_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="recipe kind.*'image'.*kind='scalar'"):
        load_image_recipe({"kind": "scalar"})
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"tokenizer": {}}))
    with pytest.raises(ValueError, match="top-level 'kind'"):
        main(["tokenizer", "train", "--recipe", str(bad), "--data", str(tmp_path), "--out", str(tmp_path / "o")])


def test_train_eval_and_tokenize_with_the_scalar_recipe(mocks, tmp_path, capsys):
    train, held_out = mocks
    out = tmp_path / "toks"
    assert main(["tokenizer", "train", "--recipe", str(REPO / "tokenizers" / "scalars.yaml"),
                 "--data", str(train), "--out", str(out / "scalars"), "--quiet"]) == 0
    saved = sorted(p.name for p in (out / "scalars" / "tokenizer").iterdir())
    assert "legacysurvey_flux_g" in saved and "provabgs_log_mstar" in saved and "desi_z" in saved

    assert main(["tokenizer", "eval", str(out / "scalars"), "--data", str(held_out),
                 "--out", str(tmp_path / "eval")]) == 0
    assert "legacysurvey_flux_g" in capsys.readouterr().out
    reports = json.loads((tmp_path / "eval" / "metrics.json").read_text())["reports"]
    flux = reports["legacysurvey_flux_r"]
    assert flux["n_valid"] > 250 and flux["binning"].endswith("+32 fine")
    # two tokens per flux: the in-range quantisation error is far below the photometric noise
    assert flux["rms_error_in_range"] < 0.1 * flux["median_sigma"]

    assert main(["tokenize", "--tokenizers", str(out), "--data", str(train), "--out", str(tmp_path / "tokens"),
                 "--quiet"]) == 0
    index = json.loads((tmp_path / "tokens" / "index.json").read_text())
    assert index["n_objects"] == 300
    assert index["modalities"]["legacysurvey_flux_g"]["num_tokens"] == 2
    assert index["modalities"]["legacysurvey_ebv"]["num_tokens"] == 1
    shard = load_token_shard(tmp_path / "tokens" / "shard_00000")
    assert shard["legacysurvey_flux_g"].shape == (300, 2)
    n_desi = int(shard["desi_z.present"].sum())
    assert 0 < n_desi < 300  # only DESI targets have a redshift token
    present = shard["legacysurvey_flux_g.present"]
    assert present.sum() > 250
    assert np.all(shard["legacysurvey_flux_g"][present, 1] >= 1024)  # fine tokens live after the coarse bins
