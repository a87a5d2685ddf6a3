"""Every benchmark figure of docs/benchmarks.md in one run and one table (~3 minutes on 2 cores).

    python benchmarks/run_all.py                          # mocks of 500 and 2000, 1 thread
    python benchmarks/run_all.py --quick                  # mocks of 200 and 600, fewer steps (~1.5 min)
    python benchmarks/run_all.py --out table.md           # also write the table as markdown
    python benchmarks/run_all.py --model DIR --tokenizers DIR          # a trained model instead
    python benchmarks/run_all.py --synthetic --parts inference --device cuda --inference-preset base  # GPU

Self-contained: it generates two mock universes (``--sizes``, each in a fresh process), builds
random-init image and spectrum tokenizers from ``tokenizers/image_cpu.yaml`` and
``tokenizers/spectrum_cpu.yaml`` (weights do not change the cost) and fits the scalar
tokenizers of ``tokenizers/scalars.yaml`` on the larger mock, pre-tokenizes both mocks with
``aion tokenize`` in fresh processes, builds a random-init model of ``--inference-preset`` over
the resulting token table, exports it like a trained one and runs ``aion embed`` /
``aion predict`` on both mocks in fresh processes. Peak memory (each child's own VmHWM) at
two data sizes shows whether memory grows with the data. Pretraining steps (tokens/s, MFU
against this machine's measured fp32 matmul peak) use synthetic batches with AION-1 shapes.
The measurements themselves are the functions of the ``bench_*.py`` scripts next to this one.

One thread by default: on a shared 2-core machine, 2 threads collapse (the tiny preset trained 45x slower
here) as soon as the other core is busy. ``--synthetic`` (automatic without astropy & co., as on
the GPU machines) skips the mock universe and times pretraining and the model alone on random
tokens. Progress goes to stderr; stdout carries the machine header and the one table.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_inference  # noqa: E402
import bench_mock_universe  # noqa: E402
import bench_pretrain  # noqa: E402
from machine_info import describe_machine  # noqa: E402

# bench_pretokenize (and aion.tokenizers.pretokenize, aion.data.crossmatch) need astropy: imported where
# used, so that --synthetic runs where only torch and the model's own dependencies are installed (a GPU box).
MOCK_NEEDS = ("astropy", "astropy_healpix", "h5py", "scipy", "kcorrect", "speclite")


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """The names that cannot be imported here (find_spec without importing them)."""
    out = []
    for name in names:
        try:
            if importlib.util.find_spec(name) is None:
                out.append(name)
        except (ImportError, ValueError):
            out.append(name)
    return out

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("mock", "tokenizers", "pretrain", "pretokenize", "inference")
NEEDS_DATA = {"tokenizers", "pretokenize", "inference"}
T_START = time.perf_counter()


@dataclass
class Row:
    """One line of the table; ``key`` groups the same measurement at several data sizes."""

    section: str
    what: str
    size: str
    rate: float | None = None
    unit: str = ""
    peak_mib: float | None = None
    seconds: float | None = None
    note: str = ""
    key: str | None = None
    n: int | None = None


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:6.0f} s] {msg}", file=sys.stderr, flush=True)


def fmt_rate(x: float | None, unit: str) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    text = f"{x:.2e}" if x >= 1e5 else f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.3f}"
    return f"{text} {unit}"


# ---------------------------------------------------------------------------- parts
def part_mock(sizes: list[int], seed: int, workdir: Path) -> tuple[list[Row], dict[int, Path]]:
    """Mock-universe generation at each size in a fresh process; the data is kept for the later parts."""
    rows, roots = [], {}
    for n in sizes:
        log(f"mock universe N={n}")
        r = bench_mock_universe.run(n, seed, workdir, keep=True)
        roots[n] = r["path"]
        counts = ", ".join(f"{k} {v}" for k, v in r["counts"].items() if k not in ("truth", "legacysurvey"))
        rows.append(Row("mock", "generate (aion.mock.universe)", f"N={n}", r["gal_per_s"], "gal/s",
                        r["peak_rss_mb"], r["generate_s"], f"{r['disk_mb']:.0f} MB on disk; {counts}",
                        key="mock", n=n))
    return rows, roots


def build_tokenizers(out: Path, fit_root: Path) -> Path:
    """Random-init image / spectrum tokenizers from the CPU recipes and scalar tokenizers fitted on ``fit_root``."""
    from bench_image_tokenizer import build as build_image

    from aion.tokenizers.scalar import fit_scalar_tokenizers, load_scalar_recipe, save_scalar_tokenizers
    from aion.tokenizers.spectrum import SpectrumTokenizer, load_recipe

    torch.manual_seed(0)
    build_image(str(ROOT / "tokenizers" / "image_cpu.yaml")).save_pretrained(out / "image")
    SpectrumTokenizer(load_recipe(ROOT / "tokenizers" / "spectrum_cpu.yaml").tokenizer).save_pretrained(
        out / "spectrum")
    t0 = time.perf_counter()
    scalars = fit_scalar_tokenizers(fit_root, load_scalar_recipe(ROOT / "tokenizers" / "scalars.yaml"))
    save_scalar_tokenizers(scalars, out / "scalars")
    log(f"fitted {len(scalars)} scalar tokenizers in {time.perf_counter() - t0:.1f} s")
    return out


def synthetic_tokenizers(out: Path, seed: int = 0) -> Path:
    """As :func:`build_tokenizers` but the scalar tokenizers are fitted on synthetic values (no mock, no astropy)."""
    from bench_image_tokenizer import build as build_image
    from bench_scalar_tokenizers import synthetic_batches

    from aion.tokenizers.scalar import ScalarTokenizer, load_scalar_recipe, save_scalar_tokenizers
    from aion.tokenizers.spectrum import SpectrumTokenizer, load_recipe

    torch.manual_seed(seed)
    build_image(str(ROOT / "tokenizers" / "image_cpu.yaml")).save_pretrained(out / "image")
    SpectrumTokenizer(load_recipe(ROOT / "tokenizers" / "spectrum_cpu.yaml").tokenizer).save_pretrained(
        out / "spectrum")
    recipe = load_scalar_recipe(ROOT / "tokenizers" / "scalars.yaml")
    values = synthetic_batches(recipe.targets(), 20_000, seed)
    toks = {}
    for name in recipe.targets():
        spec = recipe.binning_for(name)
        toks[name] = ScalarTokenizer(name, spec.build(recipe.n_bins, recipe.reservoir_size, recipe.seed),
                                     fine_bins=spec.fine_bins).fit(values[name])
    save_scalar_tokenizers(toks, out / "scalars")
    return out


def load_tokenizers(tok_dir: Path) -> dict:
    """Every tokenizer under ``tok_dir`` by modality: load_tokenizer_set where astropy is installed, else the same
    walk over the saved folders (pretokenize, which holds load_tokenizer_set, imports the cross-match)."""
    try:
        from aion.tokenizers.pretokenize import load_tokenizer_set
    except ImportError:
        from aion.tokenizers.base import CONFIG_NAME, load_tokenizer

        out = {}
        for path in sorted(p.parent for p in tok_dir.rglob(CONFIG_NAME)):
            tok = load_tokenizer(path)
            out.update(dict.fromkeys(tok.modalities, tok))
        return out
    return load_tokenizer_set(tok_dir)


def synthetic_tokens(tok_dir: Path, out: Path, objects: int, seed: int = 0) -> Path:
    """A token root of random, fully observed objects over the tokenizers' token table (every modality present)."""
    from aion.model import ModalitySpec
    from aion.training.synthetic import write_token_root

    table = {name: ModalitySpec(num_tokens=t.num_tokens, vocab_size=t.vocab_size)
             for name, t in load_tokenizers(tok_dir).items()}
    return write_token_root(out, table, objects, seed=seed)


def part_tokenizers(tok_dir: Path, root: Path, n: int, batch_size: int) -> list[Row]:
    """Encode objects/s per modality on mock data (bench_pretokenize.encode_throughput); scalars summarised."""
    import bench_pretokenize

    from aion.tokenizers.pretokenize import load_tokenizer_set

    toks = load_tokenizer_set(tok_dir)
    rows, scalars = [], []
    for name, kind, count, rate in bench_pretokenize.encode_throughput(toks, root, n, batch_size):
        if kind == "scalar":
            scalars.append((name, rate, count))
            continue
        rows.append(Row("tokenizer", f"encode {name} ({kind})", f"{count} obj", rate, "obj/s",
                        note=f"{toks[name].num_tokens} tokens, vocab {toks[name].vocab_size}; batch {batch_size}"))
    if scalars:
        rates = [r for _, r, _ in scalars]
        lo, hi = min(scalars, key=lambda s: s[1]), max(scalars, key=lambda s: s[1])
        rows.append(Row("tokenizer", f"encode scalars ({len(scalars)} modalities, median)",
                        f"{max(c for *_, c in scalars)} obj", median(rates), "obj/s",
                        note=f"range {lo[1]:.2e} ({lo[0]}) - {hi[1]:.2e} ({hi[0]}) obj/s"))
    return rows


def part_pretrain(presets: list[str], objects: int, steps: int, matmul: int) -> list[Row]:
    """fp32 training steps on synthetic AION-1-shaped batches: tokens/s and MFU vs the measured matmul peak."""
    log(f"matmul peak {matmul}^3 fp32")
    peak = bench_pretrain.matmul_peak(matmul, torch.float32, reps=20)
    tokens = bench_pretrain.INPUT_BUDGET + bench_pretrain.TARGET_BUDGET
    runs = []
    for name in presets:
        log(f"pretrain steps, preset {name}")
        runs.append((name, bench_pretrain.train_steps(name, objects, steps, bf16=False)))
    # measured again after the steps, best of both: on a shared machine one measurement can be low
    peak = max(peak, bench_pretrain.matmul_peak(matmul, torch.float32, reps=20))
    rows = [Row("pretrain", f"matmul peak fp32 ({matmul}^3)", "-", peak / 1e9, "GFLOP/s",
                note="best of 2 x 20, before and after the steps; the MFU denominator")]
    for name, r in runs:
        rows.append(Row("pretrain", f"{name} fp32, fwd+bwd+AdamW", f"{objects} obj x {tokens} tok",
                        r["tokens_per_s"], "tokens/s", seconds=r["seconds"] / steps,
                        note=f"MFU {100 * r['flops_per_s'] / peak:.1f}%; {r['parameters'] / 1e6:.2f}M params "
                             f"({r['block_parameters'] / 1e6:.2f}M in blocks); {r['flops_per_token'] / 1e6:.2f} "
                             f"MFLOP/token; {steps} steps, seconds = per step"))
    return rows


def part_pretokenize(tok_dir: Path, roots: dict[int, Path], threads: int, keep: Path) -> tuple[list[Row], Path]:
    """``aion tokenize`` per size in a fresh process; the smallest size's tokens are kept in ``keep``."""
    import bench_pretokenize

    rows = []
    smallest = min(roots)
    for n, root in sorted(roots.items()):
        log(f"aion tokenize N={n}")
        count, wall, peak = bench_pretokenize.pretokenize_memory(tok_dir, root, threads,
                                                                 out=keep if n == smallest else None)
        rows.append(Row("pretokenize", "aion tokenize (all modalities)", f"N={count}", count / wall, "obj/s", peak,
                        wall, "wall time incl. start-up", key="pretokenize", n=count))
    return rows, keep


def export_random_model(tokens: Path, name: str, out: Path, seed: int = 0) -> Path:
    """A random-init ``name`` preset over the token table of ``tokens``, exported like a trained model."""
    from aion.model import FourM, modality_specs_from_index, preset
    from aion.training.checkpoint import COMPLETE, MODEL_CONFIG, WEIGHTS, export_model, save_model_config, save_weights

    torch.manual_seed(seed)
    model = FourM(preset(name, modality_specs_from_index(tokens)))
    ckpt = out / "run" / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    save_model_config(model.cfg, ckpt / MODEL_CONFIG)
    save_weights(model.state_dict(), ckpt / WEIGHTS)
    (ckpt / COMPLETE).write_text('{"step": 1}')
    log(f"exported a random-init {name} model ({model.num_parameters() / 1e6:.1f}M parameters)")
    return export_model(out / "run", out / "model")


def part_inference(model: Path, tok_dir: Path, roots: dict[int, Path], threads: int, batch_size: int, target: str,
                   device: str) -> list[Row]:
    """``aion embed`` / ``aion predict`` on each size in fresh processes (bench_inference.measure)."""
    rows = []
    for n, root in sorted(roots.items()):
        log(f"aion embed / predict N={n} on {device}")
        for r in bench_inference.measure(model, tok_dir, [root], threads, batch_size, target, device):
            rows.append(Row("inference", f"aion {r['command']} ({device})", f"N={r['objects']}", r["obj_per_s"],
                            "obj/s", r["peak_rss_mib"], r["seconds"], "wall time incl. start-up, tokenizing, "
                            "cross-match", key=f"cli {r['command']}", n=r["objects"]))
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def part_model_only(model: Path, tok_dir: Path, tokens: Path, batch_size: int, target: str,
                    device: str) -> list[Row]:
    """AionModel.embed / predict_scalar on pre-tokenized objects in this process: the network alone, no I/O."""
    import numpy as np

    from aion.data.token_shards import load_token_index, load_token_shard
    from aion.inference import AionModel
    from aion.training.checkpoint import load_pretrained

    toks_by_name = load_tokenizers(tok_dir)  # what AionModel.from_pretrained does, without needing astropy
    for tok in {id(t): t for t in toks_by_name.values()}.values():
        if hasattr(tok, "to"):
            tok.to(device)
    am = AionModel(load_pretrained(model, map_location=device), toks_by_name, chunk_size=batch_size)
    index = load_token_index(tokens)
    shards = [load_token_shard(tokens / s["name"], mmap=False) for s in index["shards"]]
    names = [m for m in am.names if m in shards[0]]
    toks = {m: np.concatenate([s[m] for s in shards]).astype(np.int64) for m in names}
    present = {m: np.concatenate([s[f"{m}.present"] for s in shards]) for m in names}
    n = len(next(iter(toks.values())))
    dev = torch.device(device)
    head = {m: v[:8] for m, v in toks.items()}, {m: v[:8] for m, v in present.items()}
    am.embed(*head, return_tokens=False)  # warm-up (allocator, kernels)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rows = []
    jobs: list[tuple[str, Callable[[], object]]] = [
        ("embed", lambda: am.embed(toks, present, return_tokens=False)),
        (f"predict {target}", lambda: am.predict_scalar(toks, present, target))]
    for label, fn in jobs:
        log(f"model only: {label} on {device}")
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        seconds = time.perf_counter() - t0
        gpu = f"; peak GPU memory {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB" if dev.type == "cuda" else ""
        tokens_per_obj = sum(am.model.cfg.modalities[m].num_tokens * present[m].mean() for m in names)
        rows.append(Row("inference", f"AionModel.{label.split()[0]} ({device}, model only)", f"N={n}", n / seconds,
                        "obj/s", seconds=seconds, note=f"{label}; pre-tokenized objects ({tokens_per_obj:.0f} tokens "
                        f"each on average), batch {batch_size}; {am.model.num_parameters() / 1e6:.1f}M params{gpu}"))
    return rows


# ---------------------------------------------------------------------------- table
def annotate_growth(rows: list[Row]) -> None:
    """Peak-memory change of each repeated measurement against its smallest size, in its note."""
    first: dict[str, Row] = {}
    for r in rows:
        if r.key is None or r.peak_mib is None:
            continue
        base = first.setdefault(r.key, r)
        if base is not r and base.n:
            d = r.peak_mib - base.peak_mib
            r.note = (f"peak {d:+.0f} MiB ({100 * d / base.peak_mib:+.0f}%) for {r.n / base.n:.0f}x the objects; "
                      + r.note)


def columns(r: Row) -> list[str]:
    return [r.section, r.what, r.size, fmt_rate(r.rate, r.unit),
            "-" if r.peak_mib is None else f"{r.peak_mib:.0f}",
            "-" if r.seconds is None else f"{r.seconds:.1f}" if r.seconds >= 1 else f"{r.seconds:.3f}", r.note]


HEAD = ["section", "measurement", "size", "throughput", "peak RSS MiB", "seconds", "notes"]


def text_table(rows: list[Row]) -> str:
    cells = [HEAD, *(columns(r) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEAD) - 1)]
    right = {3, 4, 5}
    lines = []
    for k, c in enumerate(cells):
        parts = [c[i].rjust(widths[i]) if i in right else c[i].ljust(widths[i]) for i in range(len(widths))]
        lines.append("  ".join([*parts, c[-1]]).rstrip())
        if k == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "|".join("---:" if i in (3, 4, 5) else "---"
                                                          for i in range(len(HEAD))) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in columns(r)) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main
Attempt = Callable[[str, Callable[[], object]], object]


def run_mock(args: argparse.Namespace, sizes: list[int], presets: list[str], steps: int, encode_n: int, work: Path,
             rows: list[Row], attempt: Attempt) -> None:
    """Every part on two mock universes (the default)."""
    roots: dict[int, Path] = {}
    if NEEDS_DATA & set(args.parts) or "mock" in args.parts:
        got = attempt("mock", lambda: part_mock(sizes, args.seed, work))
        if got:
            mock_rows, roots = got
            rows += mock_rows
    tok_dir = args.tokenizers
    if roots and tok_dir is None and NEEDS_DATA & set(args.parts):
        log("building tokenizers")
        tok_dir = attempt("tokenizers", lambda: build_tokenizers(work / "tokenizers", roots[max(roots)]))
    if "tokenizers" in args.parts and roots and tok_dir:
        rows += attempt("tokenizers", lambda: part_tokenizers(tok_dir, roots[max(roots)], encode_n, 128)) or []
    if "pretrain" in args.parts:
        rows += attempt("pretrain", lambda: part_pretrain(presets, 8, steps, 1024)) or []
    tokens = None
    if roots and tok_dir and {"pretokenize", "inference"} & set(args.parts):
        sub = roots if "pretokenize" in args.parts else {min(roots): roots[min(roots)]}
        got = attempt("pretokenize", lambda: part_pretokenize(tok_dir, sub, args.threads, work / "tokens"))
        if got:
            tok_rows, tokens = got
            rows += tok_rows if "pretokenize" in args.parts else []
    if "inference" in args.parts and roots and tok_dir and tokens:
        model = args.model or attempt("inference", lambda: export_random_model(tokens, args.inference_preset,
                                                                                work / "model"))
        if model:
            rows += attempt("inference", lambda: part_model_only(model, tok_dir, tokens, args.batch_size,
                                                                  args.target, args.device)) or []
            rows += attempt("inference", lambda: part_inference(model, tok_dir, roots, args.threads,
                                                                 args.batch_size, args.target, args.device)) or []


def run_synthetic(args: argparse.Namespace, presets: list[str], steps: int, work: Path, rows: list[Row],
                  attempt: Attempt) -> None:
    """Pretraining and model-only inference on random tokens: what needs no mock universe (no astropy)."""
    for part in ("mock", "tokenizers", "pretokenize"):
        if part in args.parts:
            rows.append(Row(part, "skipped", "-", note="needs the mock universe (astropy, h5py); --synthetic"))
    if "pretrain" in args.parts:
        rows += attempt("pretrain", lambda: part_pretrain(presets, 8, steps, 1024)) or []
    if "inference" not in args.parts:
        return
    rows.append(Row("inference", "aion embed / predict (CLI)", "-", note="skipped: the CLI reads MMU data "
                    "(cross-match needs astropy); --synthetic times the model alone"))
    log("building tokenizers and a synthetic token root")
    tok_dir = args.tokenizers or attempt("tokenizers", lambda: synthetic_tokenizers(work / "tokenizers", args.seed))
    if not tok_dir:
        return
    tokens = attempt("inference", lambda: synthetic_tokens(tok_dir, work / "tokens", args.synthetic_objects,
                                                           args.seed))
    if not tokens:
        return
    model = args.model or attempt("inference", lambda: export_random_model(tokens, args.inference_preset,
                                                                            work / "model"))
    if model:
        rows += attempt("inference", lambda: part_model_only(model, tok_dir, tokens, args.batch_size, args.target,
                                                              args.device)) or []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads here and OMP_NUM_THREADS of every child (default 1: on a shared 2-core VM "
                         "two threads collapse when the other core is busy; the other figures in docs are 1-thread)")
    ap.add_argument("--quick", action="store_true", help="smaller mocks and fewer steps (~2 min on 2 cores)")
    ap.add_argument("--out", type=Path, default=None, help="also write the header and table as markdown here")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to run (default: all)")
    ap.add_argument("--sizes", type=int, nargs=2, default=None, metavar=("N_SMALL", "N_LARGE"),
                    help="mock-universe sizes (default 500 2000; --quick 200 600)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", type=Path, default=None, help="exported model folder to use for inference "
                    "(default: a random-init --inference-preset over the mock token table); needs --tokenizers")
    ap.add_argument("--tokenizers", type=Path, default=None,
                    help="saved tokenizer set to use (default: random-init CPU presets + fitted scalars)")
    ap.add_argument("--inference-preset", default="mini", help="preset of the random-init inference model")
    ap.add_argument("--device", default="cpu", help="device of the inference part (cpu, cuda); the rest is CPU")
    ap.add_argument("--batch-size", type=int, default=256, help="objects per batch in embed / predict")
    ap.add_argument("--target", default="desi_z", help="scalar target of predict")
    ap.add_argument("--presets", nargs="+", default=None,
                    help="pretraining presets (default tiny mini small; --quick tiny mini)")
    ap.add_argument("--synthetic", action="store_true",
                    help="no mock universe (no astropy needed): pretraining and model-only inference on random tokens "
                         "over random-init tokenizers; chosen automatically when astropy / h5py are missing")
    ap.add_argument("--synthetic-objects", type=int, default=4096, help="objects of the synthetic token root")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()
    if args.model is not None and args.tokenizers is None:
        ap.error("--model needs --tokenizers (the tokenizers it was trained with)")
    sizes = sorted(args.sizes or ((200, 600) if args.quick else (500, 2000)))
    presets = args.presets or (["tiny", "mini"] if args.quick else ["tiny", "mini", "small"])
    steps = 2 if args.quick else 4
    encode_n = 256 if args.quick else 512
    missing = missing_modules(MOCK_NEEDS)
    synthetic = args.synthetic or bool(missing)
    if missing and not args.synthetic:
        log(f"missing {missing}: no mock universe, running --synthetic")
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)  # every child

    header = [f"machine: {describe_machine()}",
              f"threads: {args.threads} torch thread(s) in this process and OMP_NUM_THREADS={args.threads} in every "
              f"child process; inference device: {args.device}"]
    if args.device.startswith("cuda") and torch.cuda.is_available():
        header.append(f"gpu: {torch.cuda.get_device_name(torch.device(args.device))}, CUDA {torch.version.cuda}")
    header.append(f"command: python benchmarks/run_all.py {' '.join(sys.argv[1:])}".rstrip())
    data = (f"synthetic tokens, {args.synthetic_objects} objects" + (f" (missing {missing})" if missing else "")
            if synthetic else f"mock sizes {sizes}")
    fitted = "synthetic values" if synthetic else "the mock"
    header.append(f"date: {datetime.datetime.now().isoformat(timespec='minutes')}; data: {data}; tokenizers: "
                  f"{args.tokenizers or f'random-init image_cpu + spectrum_cpu, scalars fitted on {fitted}'}; "
                  f"model: {args.model or f'random-init {args.inference_preset} preset over the token table'}")
    rows: list[Row] = []
    failed: list[str] = []

    def attempt(name: str, fn: Callable[[], object]) -> object:
        """Run one part; a failure becomes a table row (and exit code 1) instead of ending the run."""
        try:
            return fn()
        except (Exception, SystemExit) as err:  # run_child raises SystemExit on a failed child
            traceback.print_exc(file=sys.stderr)
            failed.append(name)
            msg = " ".join(str(err).split())
            rows.append(Row(name, "FAILED", "-", note=f"{type(err).__name__}: {msg[:160]}"))
            return None

    with tempfile.TemporaryDirectory(prefix="aion_run_all_", dir=args.workdir) as tmp:
        work = Path(tmp)
        if synthetic:
            run_synthetic(args, presets, steps, work, rows, attempt)
        else:
            run_mock(args, sizes, presets, steps, encode_n, work, rows, attempt)

    annotate_growth(rows)
    wall = time.perf_counter() - T_START
    footer = f"total wall time {wall:.0f} s ({wall / 60:.1f} min)" + (f"; FAILED parts: {failed}" if failed else "")
    print("\n".join(f"# {h}" for h in header))
    print(text_table(rows))
    print(f"# {footer}")
    if args.out is not None:
        args.out.write_text("\n".join(f"- {h}" for h in header) + "\n\n" + markdown_table(rows) + f"\n\n{footer}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
