"""``aion quickstart``: stages are cached, a Ctrl-C (KeyboardInterrupt) mid-pretraining resumes without redoing finished
stages, a changed recipe reruns only what depends on it, and the report shows the key results."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import yaml

from aion.pipeline import Pipeline, PipelineConfig, load_pipeline
from aion.pipeline.config import REPO, DiscoveryStage, MockData

MASS_SUITE = {"name": "tiny", "targets": ["provabgs_log_mstar"], "input_sets": ["photometry"], "sizes": ["all"],
              "seeds": [0], "fm_methods": ["linear"], "finetune": [], "baselines": ["constant"], "min_val": 3}


def _write(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _shrunk(recipe: str, tmp: Path, **train) -> str:
    data = yaml.safe_load((REPO / recipe).read_text())
    data["train"].update(train)
    return _write(tmp / Path(recipe).name, data)


def tiny_config(tmp: Path) -> PipelineConfig:
    """The quickstart's stages on a few hundred objects with a handful of steps each."""
    image = _shrunk("tokenizers/image_quick.yaml", tmp, steps=4, batch_size=8, checkpoint_every=2, log_every=2,
                    warmup_steps=1)
    spec_data = yaml.safe_load((REPO / "tokenizers/spectrum_quick.yaml").read_text())
    spec_data["train"].update(steps=3, batch_size=8, checkpoint_every=2, log_every=1, warmup_steps=1)
    spec_data["data"]["extra_from_truth"] = 40
    spectrum = _write(tmp / "spectrum_quick.yaml", spec_data)
    pre = yaml.safe_load((REPO / "training/quickstart_cpu.yaml").read_text())
    pre["model"] = {"preset": "tiny", "ordinal_features": 4, "ordinal_sigma": 2.0}
    pre["masking"].update(input_budget=48, target_budget=24)
    pre["optim"].update(steps=12, warmup_steps=2, global_batch_size=8)
    pre["runtime"].update(log_every=2, checkpoint_every=4)
    return PipelineConfig(
        name="tiny", mock=MockData(n_train=300, n_heldout=300, image_size=32, hsc_image_size=48),
        tokenizers=("tokenizers/scalars.yaml", image, spectrum), pretrain=_write(tmp / "pre.yaml", pre),
        zeroshot={"gen_steps": 2, "gen_samples": 1, "plots": False,
                  "gbm_grid": [{"learning_rate": 0.1, "max_leaf_nodes": 7, "min_samples_leaf": 5}]},
        evaluate=_write(tmp / "suite.yaml", MASS_SUITE), threads=2,
        discovery=DiscoveryStage(flow={"steps": 30, "hidden": 32, "depth": 1, "ode_steps": 4}, map_method="pca",
                                 nll_negatives=40, nll_ode_steps=2))


def _digests(*roots: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for root in roots for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_sigint_mid_pretraining_resumes_and_caches(tmp_path, monkeypatch):
    from aion.training.loop import Pretrainer

    cfg = tiny_config(tmp_path)
    out = tmp_path / "run"
    original = Pretrainer.save_checkpoint

    def interrupt_after_step_4(self, step):
        path = original(self, step)
        if step == 4:  # Ctrl-C right after the first checkpoint, as Python delivers it: a KeyboardInterrupt
            # (raised here rather than sent with os.kill: after ~220 other tests in the same process a real
            # SIGINT was, reproducibly but only then, not turned into KeyboardInterrupt; the conversion is
            # CPython's, what is ours is what the pipeline does with the exception)
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(Pretrainer, "save_checkpoint", interrupt_after_step_4)
    messages: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        Pipeline(cfg, out_dir=out, progress=False, echo=messages.append).run()
    assert any("interrupted in stage 'pretrain'" in m for m in messages)
    manifest = json.loads((out / "pipeline.json").read_text())
    status = {k: v["status"] for k, v in manifest["stages"].items()}
    assert status == {"data": "done", "tokenizers": "done", "tokens": "done", "pretrain": "running"}
    assert not (out / "model").exists() and not (out / "report.md").exists()
    before = _digests(out / "data", out / "tokenizers", out / "tokens")
    monkeypatch.setattr(Pretrainer, "save_checkpoint", original)

    messages.clear()
    manifest = Pipeline(cfg, out_dir=out, progress=False, echo=messages.append).run()
    listing = "\n".join(messages)
    for title in ("data (mock", "tokenizers (train", "pre-tokenization"):
        assert any(title in m and "done (cached)" in m for m in messages), listing
    assert any("pretraining" in m and "resume" in m for m in messages), listing
    assert _digests(out / "data", out / "tokenizers", out / "tokens") == before  # nothing redone or rewritten
    pre = manifest["stages"]["pretrain"]["summary"]
    assert pre["start_step"] == 4 and pre["step"] == 12  # resumed from the checkpoint, not from scratch
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    assert (out / "model" / "model.safetensors").is_file()

    report = (out / "report.md").read_text()
    assert "## Key results" in report and "FM zero-shot, photometry+image" in report
    assert "trivial (training z distribution)" in report and "| constant |" in report
    assert (out / "report" / "key_results.png").is_file()
    assert "## Discovery on the held-out objects" in report and "forgets conditions" in report
    assert (out / "discovery" / "outliers.parquet").is_file() and (out / "discovery" / "map" / "map_Z.png").is_file()
    facts = json.loads((out / "report" / "key_results.json").read_text())
    assert {"redshift_nmad_ratio", "mass_r2"} <= set(facts)

    # a rerun does nothing; a changed evaluation suite reruns only the evaluation and the report
    messages.clear()
    Pipeline(cfg, out_dir=out, progress=False, echo=messages.append).run()
    assert any("nothing to do" in m for m in messages)
    model_before = _digests(out / "model", out / "zeroshot")
    cfg.evaluate = _write(tmp_path / "suite2.yaml", {**MASS_SUITE, "fm_methods": ["knn"]})
    messages.clear()
    manifest = Pipeline(cfg, out_dir=out, progress=False, echo=messages.append).run()
    to_run = [m for m in messages if m.rstrip().endswith("to run")]
    assert len(to_run) == 2 and "evaluation suite" in to_run[0] and "report" in to_run[1], messages
    assert _digests(out / "model", out / "zeroshot") == model_before
    methods = {r["method"] for r in json.loads((out / "evaluate" / "results.json").read_text())["records"]}
    assert methods == {"FM knn", "constant"}  # the stale linear-probe results were removed, not mixed in

    # a bigger held-out universe remakes only that universe and the measurements, not the model
    trained = _digests(out / "data" / "train", out / "tokenizers", out / "tokens", out / "model")
    cfg.mock = MockData(n_train=300, n_heldout=320, image_size=32, hsc_image_size=48)
    messages.clear()
    manifest = Pipeline(cfg, out_dir=out, progress=False, echo=messages.append).run()
    to_run = [m.split(".", 1)[1].strip() for m in messages if m.rstrip().endswith("to run")]
    assert [t.split()[0] for t in to_run] == ["data", "zero-shot", "evaluation", "discovery", "report"], messages
    assert _digests(out / "data" / "train", out / "tokenizers", out / "tokens", out / "model") == trained
    assert manifest["stages"]["data"]["summary"]["counts"]["heldout"]["legacysurvey"] == 320

    # a launcher prefix runs pretraining as a child command (here plain `python`, as `accelerate launch` would)
    cfg.launcher = (sys.executable,)
    messages.clear()
    manifest = Pipeline(cfg, out_dir=out, progress=False, echo=messages.append).run()
    assert any(m.startswith(f"   $ {sys.executable} -m aion.cli pretrain --recipe") for m in messages), messages
    assert manifest["stages"]["pretrain"]["summary"]["launcher"] == [sys.executable]
    assert manifest["stages"]["pretrain"]["summary"]["last"]["step"] == 12
    assert (out / "model" / "model.safetensors").is_file() and (out / "report.md").is_file()


def test_recipe_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        from aion.config import from_dict

        from_dict(PipelineConfig, {"nme": "x"}, "recipe")
    with pytest.raises(ValueError, match="seed_train and seed_heldout"):
        MockData(seed_train=1, seed_heldout=1)
    with pytest.raises(ValueError, match="give both train_data and heldout_data"):
        PipelineConfig(mock=None, train_data="somewhere")
    with pytest.raises(ValueError, match="zeroshot.*gen_stepz"):
        PipelineConfig(zeroshot={"gen_stepz": 2})
    with pytest.raises(FileNotFoundError, match="no_such_recipe.yaml"):
        Pipeline(PipelineConfig(pretrain="training/no_such_recipe.yaml"), out_dir=tmp_path / "x")
    # a folder with stage outputs but no manifest is not silently overwritten
    (tmp_path / "y" / "tokens").mkdir(parents=True)
    from aion.pipeline import PipelineError

    with pytest.raises(PipelineError, match="pipeline.json"):
        Pipeline(PipelineConfig(), out_dir=tmp_path / "y").run()


def test_shipped_recipes_load():
    for path in sorted((REPO / "training" / "pipelines").glob("*.yaml")):
        cfg, recipe_dir = load_pipeline(path)
        Pipeline(cfg, recipe_dir, out_dir="/nonexistent/never-written")  # every referenced recipe resolves
