"""``aion evaluate`` end to end on a tiny mock universe: same splits for every method, resume, report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import export_tiny_model, specs_of

from aion.cli import main
from aion.data.batches import ScalarBatch
from aion.evaluation.labelled import LEGACY_PHOTOMETRY, load_labelled_set
from aion.evaluation.suite import SuiteConfig, load_suite, run_suite
from aion.tokenizers.binning import QuantileBinning
from aion.tokenizers.scalar import ScalarTokenizer

torch.set_num_threads(1)
TARGETS = ("provabgs_log_mstar", "provabgs_z")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from aion.mock.universe import MockConfig, generate

    tmp = tmp_path_factory.mktemp("suite")
    data = tmp / "mock"
    generate(data, MockConfig(n=450, seed=4, image_size=16, hsc_image_size=16), progress=False)
    labelled = load_labelled_set(data, TARGETS, LEGACY_PHOTOMETRY)
    assert len(labelled) >= 30, len(labelled)
    toks = {}
    for name in LEGACY_PHOTOMETRY:
        b = labelled.inputs[name]
        toks[name] = ScalarTokenizer(name, QuantileBinning(16)).fit(ScalarBatch(name=name, values=b.values[b.valid]))
    model_dir = export_tiny_model(specs_of(toks), tmp)
    for name, tok in toks.items():
        tok.save_pretrained(model_dir / "tokenizers" / name)
    return {"tmp": tmp, "data": data, "model": model_dir, "n_labelled": len(labelled)}


def _cfg(**kw) -> SuiteConfig:
    base = dict(name="tiny", targets=TARGETS, input_sets=("photometry",), sizes=(16, "all"), seeds=(0, 1),
                min_val=3, fm_methods=("linear", "knn"), finetune=(), baselines=("gbm",))
    return SuiteConfig(**{**base, **kw})


def _records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_suite_runs_every_method_on_the_same_splits_and_resumes(world, monkeypatch):
    out = world["tmp"] / "eval"
    cfg = _cfg()
    meta = run_suite(cfg, world["data"], out, model_dir=world["model"], tokenizers_dir=world["model"] / "tokenizers",
                     progress=False)
    recs = _records(out)
    # 2 targets x 1 input set x 2 sizes x 2 seeds x 3 methods
    assert len(recs) == 24
    by_split: dict[tuple, set] = {}
    for r in recs:
        by_split.setdefault((r["target"], r["size"], r["seed"]), set()).add(r["effective_size"])
        assert np.isfinite(r["metrics"]["r2"]) and r["metrics"]["n"] == meta["n_test"]
    assert all(len(v) == 1 for v in by_split.values())  # every method saw the same number of labels
    assert {r["method_key"] for r in recs} == {"FM linear", "FM knn", "GBM"}
    z = [r for r in recs if r["target"] == "provabgs_z"]
    assert all("nmad" in r["metrics"] for r in z)
    report = (out / "report.md").read_text()
    assert "| foundation model | photometry | FM linear |" in report and "LOG_MSTAR" in report
    assert (out / "curves_photometry.png").stat().st_size > 0 and (out / "pred_vs_true.png").exists()
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["records"]) == 24 and saved["meta"]["splits"]["provabgs_z"]["test_digest"]

    # a rerun resumes: nothing is fitted again and the records are unchanged
    from aion.evaluation import baselines

    def boom(*a, **k):
        raise AssertionError("a finished run was fitted again")

    monkeypatch.setattr(baselines.GBMBaseline, "fit", boom)
    run_suite(cfg, world["data"], out, model_dir=world["model"], tokenizers_dir=world["model"] / "tokenizers",
              progress=False)
    assert _records(out) == recs
    # --restart starts over (and here fails loudly in the patched method)
    with pytest.raises(AssertionError, match="fitted again"):
        run_suite(cfg, world["data"], out, model_dir=world["model"], tokenizers_dir=world["model"] / "tokenizers",
                  restart=True, progress=False)


def test_suite_cli_baselines_only_and_errors(world, tmp_path, capsys):
    suite = tmp_path / "s.yaml"
    suite.write_text("name: cli\ntargets: [provabgs_z]\ninput_sets: [photometry]\nsizes: [16]\nseeds: [0]\n"
                     "min_val: 3\nfm_methods: [linear]\nbaselines: [gbm]\n")
    assert main(["evaluate", "--tasks", str(suite), "--data", str(world["data"]), "--out", str(tmp_path / "o"),
                 "--quiet"]) == 0
    recs = _records(tmp_path / "o")
    assert [r["method_key"] for r in recs] == ["GBM"]  # no model: foundation-model methods are dropped
    assert "| baseline | photometry | GBM |" in capsys.readouterr().out
    # the model's tokenizers default to MODEL/tokenizers
    assert main(["evaluate", "--tasks", str(suite), "--data", str(world["data"]), "--out", str(tmp_path / "m"),
                 "--model", str(world["model"]), "--quiet"]) == 0
    assert {r["method_key"] for r in _records(tmp_path / "m")} == {"FM linear", "GBM"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nfm_methods: [ridge]\n")
    with pytest.raises(SystemExit, match="fm_methods: unknown"):
        main(["evaluate", "--tasks", str(bad), "--data", str(world["data"]), "--out", str(tmp_path / "b")])
    with pytest.raises(ValueError, match="give the model"):
        run_suite(_cfg(), world["data"], tmp_path / "x", progress=False)
    assert load_suite("evaluation/full.yaml").finetune == ("lora", "full")
    assert load_suite("evaluation/quick.yaml").seeds == (0,)
    shipped = sorted(Path("evaluation").glob("*.yaml"))
    assert len(shipped) >= 7
    for path in shipped:  # every suite the docs point to parses, with known targets and input sets
        suite = load_suite(str(path))
        assert suite.targets and suite.input_sets and suite.sizes and suite.seeds, path


def test_resuming_with_another_setup_is_refused(world, tmp_path):
    out = tmp_path / "e"
    cfg = _cfg(targets=("provabgs_z",), sizes=(16,), seeds=(0,), fm_methods=(), baselines=("gbm",))
    run_suite(cfg, world["data"], out, progress=False)
    with pytest.raises(ValueError, match="different setup.*test_fraction"):
        run_suite(SuiteConfig(**{**cfg.__dict__, "test_fraction": 0.3}), world["data"], out, progress=False)
    # adding a method to the same setup resumes: only the new runs are fitted
    more = SuiteConfig(**{**cfg.__dict__, "baselines": ("gbm", "net")})
    run_suite(more, world["data"], out, progress=False)
    assert sorted(r["method_key"] for r in _records(out)) == ["GBM", "net"]
