"""``aion quickstart``: data -> tokenizers -> tokens -> pretraining -> zero-shot -> evaluation -> report.

Every stage writes into its own folder under ``out_dir`` and is recorded in ``pipeline.json`` with a
fingerprint of what it was made from (its recipe files' bytes, its options and its inputs'
fingerprints). A rerun skips a stage whose fingerprint is unchanged and whose outputs exist; a changed
recipe reruns that stage and everything downstream (the stale outputs are removed first). An
interrupted stage resumes with its own machinery: tokenizer and pretraining checkpoints, the
pre-tokenizer's finished shards, the evaluation suite's ``results.jsonl``; the mock universe and the
zero-shot measurement are short and are simply redone (they write to a temporary folder renamed
when complete, so an interruption never leaves half a result under the final name).

The fingerprints cover recipes and options, not the library's code: after upgrading ``aion``, pass
``--restart`` to rebuild everything.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aion.evaluation.report import write_text_atomic
from aion.pipeline.config import STAGES, PipelineConfig, resolve_path

MANIFEST = "pipeline.json"
TITLES = {"data": "data (mock universes: training + held out)", "tokenizers": "tokenizers (train / fit)",
          "tokens": "pre-tokenization", "pretrain": "pretraining", "zeroshot": "zero-shot prediction",
          "evaluate": "evaluation suite", "discovery": "discovery (search, outliers, map, residuals)",
          "report": "report"}


class PipelineError(RuntimeError):
    """A pipeline that cannot start or go on (the message says what to do)."""


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _fmt(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


@dataclass
class Stage:
    name: str
    inputs: dict[str, Any]
    """What the stage is made from (digested into its fingerprint)."""
    outputs: list[Path]
    run: Callable[[], dict[str, Any]]
    """Does the work (resuming where its tool can) and returns a summary for the manifest."""
    remove_stale: bool = True
    """False: the stage finds its own stale parts (the data stage keeps an unchanged universe)."""
    fingerprint: str = ""


class Pipeline:
    def __init__(self, cfg: PipelineConfig, recipe_dir: Path | None = None, out_dir: str | Path | None = None,
                 progress: bool = True, echo: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.out = Path(out_dir if out_dir is not None else cfg.out_dir).resolve()
        self.progress = progress
        self.echo = echo or (lambda msg: print(msg, flush=True))
        # every recipe file is resolved now: a typo fails before an hour of work, not after
        self.tokenizer_recipes = {Path(t).stem: resolve_path(t, recipe_dir) for t in cfg.tokenizers}
        self.pretrain_recipe = resolve_path(cfg.pretrain, recipe_dir)
        self.suite = resolve_path(cfg.evaluate, recipe_dir)
        if cfg.mock is None:
            assert cfg.train_data is not None and cfg.heldout_data is not None
            self.train_data = resolve_path(cfg.train_data, recipe_dir)
            self.heldout_data = resolve_path(cfg.heldout_data, recipe_dir)
        else:
            self.train_data = self.out / "data" / "train"
            self.heldout_data = self.out / "data" / "heldout"
        self.tokenizers_dir = self.out / "tokenizers"
        self.tokens_dir = self.out / "tokens"
        self.run_dir = self.out / "pretrain"
        self.model_dir = self.out / "model"
        self.stages = self._plan()

    # ------------------------------------------------------------------ plan
    def _plan(self) -> list[Stage]:
        c = self.cfg
        # each universe has its own fingerprint: a new held-out set must not retrain the model
        self.universes = self._universe_specs()
        fps: dict[str, str] = {f"data:{k}": _digest(v) for k, v in self.universes.items()}
        stages = [
            Stage("data", dict(self.universes),
                  [self.out / "data" / k for k in self.universes] if c.mock is not None else [], self._data,
                  remove_stale=False),
            Stage("tokenizers", {"recipes": {k: _file_digest(p) for k, p in self.tokenizer_recipes.items()}},
                  [self.tokenizers_dir], self._tokenizers),
            Stage("tokens", {}, [self.tokens_dir], self._tokens),
            Stage("pretrain", {"recipe": _file_digest(self.pretrain_recipe), "launcher": list(c.launcher)},
                  [self.run_dir, self.model_dir], self._pretrain),
            Stage("zeroshot", {"options": c.zeroshot}, [self.out / "zeroshot"], self._zeroshot),
            Stage("evaluate", {"suite": _file_digest(self.suite)}, [self.out / "evaluate"], self._evaluate),
            Stage("discovery", {"options": None if c.discovery is None else asdict(c.discovery)},
                  [self.out / "discovery"] if c.discovery is not None else [], self._discovery),
            Stage("report", {"version": 1}, [self.out / "report.md", self.out / "report"], self._report),
        ]
        upstream = {"data": [], "tokenizers": ["data:train"], "tokens": ["tokenizers"], "pretrain": ["tokens"],
                    "zeroshot": ["pretrain", "data:train", "data:heldout"], "evaluate": ["pretrain", "data:heldout"],
                    "discovery": ["pretrain", "data:heldout"], "report": ["zeroshot", "evaluate", "discovery"]}
        for s in stages:
            s.fingerprint = _digest({"stage": s.name, **s.inputs, "upstream": [fps[u] for u in upstream[s.name]]})
            fps[s.name] = s.fingerprint
        assert [s.name for s in stages] == list(STAGES)
        return stages

    def _universe_specs(self) -> dict[str, dict[str, Any]]:
        m = self.cfg.mock
        if m is None:
            return {"train": {"path": str(self.train_data)}, "heldout": {"path": str(self.heldout_data)}}
        size = {"image_size": m.image_size, "hsc_image_size": m.hsc_image_size}
        return {"train": {"n": m.n_train, "seed": m.seed_train, **size},
                "heldout": {"n": m.n_heldout, "seed": m.seed_heldout, **size}}

    # ------------------------------------------------------------------ manifest
    def _manifest_path(self) -> Path:
        return self.out / MANIFEST

    def read_manifest(self) -> dict[str, Any]:
        path = self._manifest_path()
        if not path.is_file():
            return {"name": self.cfg.name, "stages": {}}
        return json.loads(path.read_text())

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        write_text_atomic(self._manifest_path(), json.dumps(manifest, indent=1, default=str))

    def is_done(self, stage: Stage, manifest: dict[str, Any]) -> bool:
        entry = manifest["stages"].get(stage.name)
        return (entry is not None and entry.get("status") == "done" and entry.get("fingerprint") == stage.fingerprint
                and all(p.exists() for p in stage.outputs))

    # ------------------------------------------------------------------ run
    def run(self, restart: bool = False) -> dict[str, Any]:
        """Run the stages that are not done; returns the manifest. Raises KeyboardInterrupt through
        (after saying how to resume)."""
        if restart:
            self._clear_all()
        elif self.out.exists() and not self._manifest_path().is_file() and any(
                p.exists() for s in self.stages for p in s.outputs):
            raise PipelineError(f"{self.out} holds stage folders but no {MANIFEST}: it was not made by this "
                                "command (or the manifest was deleted). Choose another --out or pass --restart.")
        self.out.mkdir(parents=True, exist_ok=True)
        if self.cfg.threads is not None:
            import torch

            torch.set_num_threads(int(self.cfg.threads))
        manifest = self.read_manifest()
        manifest.update(name=self.cfg.name, out_dir=str(self.out))
        todo = [s for s in self.stages if not self.is_done(s, manifest)]
        self._announce(manifest, todo)
        t_run = time.perf_counter()
        done_est = done_real = 0.0
        for i, stage in enumerate(self.stages, 1):
            if stage not in todo:
                continue
            entry = manifest["stages"].get(stage.name)
            if entry is not None and entry.get("fingerprint") != stage.fingerprint and stage.remove_stale:
                self.echo(f"   {stage.name}: its recipe or inputs changed since the last run; removing stale outputs")
                self._remove(stage)
            est = self.cfg.estimate_seconds.get(stage.name)
            self.echo(f"[{i}/{len(self.stages)}] {TITLES[stage.name]}"
                      + (f"  (about {_fmt(est * self._speed(done_est, done_real))})" if est else ""))
            manifest["stages"][stage.name] = {"fingerprint": stage.fingerprint, "status": "running",
                                              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
            self._write_manifest(manifest)
            t0 = time.perf_counter()
            try:
                summary = stage.run()
            except KeyboardInterrupt:
                self.echo(f"\ninterrupted in stage '{stage.name}' after {_fmt(time.perf_counter() - t0)}; finished "
                          "stages are kept. Rerun the same command to resume.")
                raise
            seconds = time.perf_counter() - t0
            manifest["stages"][stage.name] = {"fingerprint": stage.fingerprint, "status": "done",
                                              "seconds": seconds, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                              "summary": summary}
            self._write_manifest(manifest)
            if est:
                done_est, done_real = done_est + est, done_real + seconds
            left = sum(self.cfg.estimate_seconds.get(s.name, 0.0) for s in todo[todo.index(stage) + 1:])
            self.echo(f"   done in {_fmt(seconds)}; elapsed {_fmt(time.perf_counter() - t_run)}"
                      + (f", about {_fmt(left * self._speed(done_est, done_real))} to go" if left else ""))
        manifest["last_run_seconds"] = time.perf_counter() - t_run
        self._write_manifest(manifest)
        return manifest

    def _speed(self, est: float, real: float) -> float:
        """How much slower than the reference machine this run has been so far (1 before any stage)."""
        return real / est if est > 0 and real > 0 else 1.0

    def _announce(self, manifest: dict[str, Any], todo: list[Stage]) -> None:
        self.echo(f"aion pipeline '{self.cfg.name}' -> {self.out}")
        for i, s in enumerate(self.stages, 1):
            state = "to run" if s in todo else "done (cached)"
            if s in todo and manifest["stages"].get(s.name, {}).get("status") == "running":
                state = "resume"
            self.echo(f"  {i}. {TITLES[s.name]:<46} {state}")
        total = sum(self.cfg.estimate_seconds.get(s.name, 0.0) for s in todo)
        if todo and total:
            where = f" on {self.cfg.reference_machine}" if self.cfg.reference_machine else ""
            self.echo(f"  estimated time{where}: about {_fmt(total)} (min:s)")
        elif not todo:
            self.echo(f"  nothing to do: every stage is up to date; the report is {self.out / 'report.md'}")

    def _remove(self, stage: Stage) -> None:
        for p in stage.outputs:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    def _clear_all(self) -> None:
        for s in self.stages:
            self._remove(s)
        if self.cfg.mock is not None:
            shutil.rmtree(self.out / "data", ignore_errors=True)
        self._manifest_path().unlink(missing_ok=True)

    # ------------------------------------------------------------------ stages
    def _data(self) -> dict[str, Any]:
        """Both universes at once, one process each (the generator is single-threaded numpy)."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        if self.cfg.mock is None:  # external data: nothing to make
            return {"train_data": str(self.train_data), "heldout_data": str(self.heldout_data)}
        jobs = []
        for name, spec in self.universes.items():
            final = self.out / "data" / name
            stamp = final / "spec.json"
            if final.is_dir() and (not stamp.is_file() or json.loads(stamp.read_text()) != spec):
                self.echo(f"   {name} universe: its specification changed; making it again")
                shutil.rmtree(final)
            if not final.is_dir():  # a finished universe is kept; an interrupted one is redone whole
                jobs.append((str(final), spec, self.progress and not jobs))  # one progress bar: the first job's
        if len(jobs) == 1:
            _make_universe(*jobs[0])
        elif jobs:
            with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
                for f in [pool.submit(_make_universe, *job) for job in jobs]:
                    f.result()
        counts = {name: json.loads((self.out / "data" / name / "summary.json").read_text())["counts"]
                  for name in ("train", "heldout")}
        return {"counts": counts}

    def _tokenizers(self) -> dict[str, Any]:
        from aion.tokenizers.recipes import train_tokenizer

        self.tokenizers_dir.mkdir(parents=True, exist_ok=True)
        metrics = {}
        for stem, recipe in self.tokenizer_recipes.items():
            out = self.tokenizers_dir / stem
            stamp = out / "pipeline_fingerprint.txt"
            fp = _digest({"recipe": _file_digest(recipe), "data": str(self.train_data)})
            if out.exists() and (not stamp.is_file() or stamp.read_text() != fp):
                shutil.rmtree(out)  # checkpoints of another recipe must not be resumed
            out.mkdir(parents=True, exist_ok=True)
            stamp.write_text(fp)
            self.echo(f"   - {stem} ({recipe})")
            metrics[stem] = {k: v for k, v in train_tokenizer(recipe, self.train_data, out,
                                                               progress=self.progress).items()
                             if isinstance(v, int | float | str)}
        return {"tokenizers": metrics}

    def _tokens(self) -> dict[str, Any]:
        from aion.tokenizers.pretokenize import pretokenize

        index = pretokenize(self.train_data, self.tokenizers_dir, self.tokens_dir, progress=self.progress)
        return {"n_objects": index["n_objects"],
                "modalities": {k: {"num_tokens": v["num_tokens"], "present": v["present"]}
                               for k, v in index["modalities"].items()}}

    def _pretrain(self) -> dict[str, Any]:
        from aion.training.checkpoint import export_model, resolve_checkpoint
        from aion.training.config import load_recipe, with_overrides
        from aion.training.loop import read_metrics

        cfg = with_overrides(load_recipe(self.pretrain_recipe), tokens=self.tokens_dir, out_dir=self.run_dir)
        if self.cfg.launcher:
            cmd = [*self.cfg.launcher, "-m", "aion.cli", "pretrain", "--recipe", str(self.pretrain_recipe),
                   "--tokens", str(self.tokens_dir), "--out", str(self.run_dir)]
            if not self.progress:
                cmd.append("--quiet")
            self.echo("   $ " + " ".join(cmd))
            proc = subprocess.run(cmd, check=False)
            if proc.returncode != 0:
                raise PipelineError(f"pretraining exited with status {proc.returncode} (command above); rerun "
                                    "to resume from its newest checkpoint")
            summary: dict[str, Any] = {"launcher": list(self.cfg.launcher)}
        else:
            from aion.training.loop import pretrain

            res = pretrain(cfg, progress=self.progress)
            summary = {k: res[k] for k in ("step", "start_step", "seconds", "num_parameters") if k in res}
        ckpt = resolve_checkpoint(self.run_dir)
        tmp = self.model_dir.with_name("model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        export_model(ckpt, tmp)
        shutil.rmtree(self.model_dir, ignore_errors=True)
        tmp.rename(self.model_dir)
        records = read_metrics(self.run_dir)
        if records:
            summary["last"] = records[-1]
        summary.update(checkpoint=str(ckpt), steps=cfg.optim.steps, preset=cfg.model.get("preset"),
                       global_batch_size=cfg.optim.global_batch_size)
        return summary

    def _zeroshot(self) -> dict[str, Any]:
        from aion.evaluation.zeroshot import ZeroShotConfig, evaluate_zeroshot

        final = self.out / "zeroshot"
        tmp = final.with_name("zeroshot.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        metrics = evaluate_zeroshot(self.model_dir, self.tokenizers_dir, self.heldout_data, self.train_data, tmp,
                                    ZeroShotConfig(**self.cfg.zeroshot), progress=self.progress)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return {"n_heldout_with_redshift": metrics["n_heldout_with_redshift"]}

    def _evaluate(self) -> dict[str, Any]:
        from aion.evaluation.suite import load_suite, run_suite

        meta = run_suite(load_suite(self.suite), self.heldout_data, self.out / "evaluate", model_dir=self.model_dir,
                         tokenizers_dir=self.tokenizers_dir, progress=self.progress)
        return {"n_labelled": meta["n_labelled"], "n_test": meta["n_test"]}

    def _discovery(self) -> dict[str, Any]:
        """Embed the held-out objects, then measure / map / rank them (written to a folder renamed when done)."""
        d = self.cfg.discovery
        if d is None:
            return {"skipped": "discovery: null in the recipe"}
        truth = Path(self.heldout_data) / "truth"
        if not truth.is_dir():
            raise PipelineError(f"discovery: the held-out data {self.heldout_data} has no truth survey, so the "
                                "discovery tools cannot be measured; set `discovery: null` in the recipe")
        from aion.cli import main as aion_main
        from aion.discovery.evaluate import DiscoveryEvalConfig, run_discovery_eval
        from aion.discovery.maps import MapConfig, run_map
        from aion.discovery.outliers import knn_density_score, rank_outliers
        from aion.discovery.tables import load_embeddings
        from aion.inference.io import TableWriter

        final = self.out / "discovery"
        work = final.with_name("discovery.tmp")
        work.mkdir(parents=True, exist_ok=True)
        emb_path = work / "embeddings.parquet"  # resumable: `aion embed` keeps its finished parts
        argv = ["embed", "--model", str(self.model_dir), "--tokenizers", str(self.tokenizers_dir),
                "--data", str(self.heldout_data), "--join", "hsc", "desi", "--out", str(emb_path)]
        if not emb_path.exists():
            aion_main(argv + ([] if self.progress else ["--quiet"]))
        metrics = run_discovery_eval(
            emb_path, truth, work / "eval",
            DiscoveryEvalConfig(conditions=d.condition, hidden=d.hidden, guidance=d.guidance, flow=d.flow,
                                nll_negatives=d.nll_negatives, nll_ode_steps=d.nll_ode_steps),
            progress=self.progress)
        run_map(emb_path, work / "map", MapConfig(method=d.map_method, colors=d.map_colors, catalogue=truth,
                                                   data=Path(self.heldout_data), max_objects=d.map_max_objects),
                progress=self.progress, log=self.echo)
        emb = load_embeddings(emb_path)
        with TableWriter(work / "outliers.parquet", {"embeddings": "embeddings.parquet", "score": "knn"}) as w:
            w.append(rank_outliers(emb.ids, {"knn": knn_density_score(emb.vectors)}, "knn"))
        shutil.rmtree(final, ignore_errors=True)
        work.rename(final)
        return {"n_objects": metrics["n_objects"],
                "verdicts": {k: bool(v["met"]) for k, v in metrics["verdicts"].items()}}

    def _report(self) -> dict[str, Any]:
        from aion.pipeline.report import write_report

        manifest = self.read_manifest()
        path = write_report(self, manifest)
        return {"report": str(path)}


def _make_universe(final: str, spec: dict[str, Any], progress: bool) -> None:
    """Generate one mock universe into ``final`` via a temporary folder renamed when complete."""
    from aion.mock.universe import MockConfig, generate

    out = Path(final)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    summary = generate(tmp, MockConfig(**spec), progress=progress)
    (tmp / "summary.json").write_text(json.dumps({"counts": summary.counts, "seconds": summary.seconds}))
    (tmp / "spec.json").write_text(json.dumps(spec))
    tmp.rename(out)


def run_pipeline(cfg: PipelineConfig, recipe_dir: Path | None = None, out_dir: str | Path | None = None,
                 restart: bool = False, progress: bool = True) -> dict[str, Any]:
    return Pipeline(cfg, recipe_dir, out_dir, progress=progress).run(restart=restart)

