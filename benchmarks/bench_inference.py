"""Throughput and peak memory of ``aion embed`` / ``aion predict`` / ``aion generate`` on CPU.

    python benchmarks/bench_inference.py --model runs/models/mock_cpu --tokenizers runs/tokenizers20k \
        --data runs/mock runs/mock20k

Each command runs in a fresh process on every data root (objects = Legacy Survey rows with the
HSC, DESI and PROVABGS rows cross-matched onto them: images, spectra and catalogue scalars).
The table shows wall time including start-up, objects/s and the child's peak resident memory
(``ru_maxrss`` from ``os.wait4``). Memory should not grow with the number of objects: the
readers stream ``--batch-size`` rows and the runner keeps at most one ``--chunk-size`` part of
output rows in memory. ``generate`` (a DESI spectrum from everything else, 8 MaskGIT steps)
runs on the first ``--generate-limit`` objects of the first root only, because it is much
slower per object.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_info import describe_machine  # noqa: E402

# ``python -c AION_CLI args...`` runs ``aion args...`` and prints its own peak memory (VmHWM, KiB) to stderr
# at exit. The child's ru_maxrss (os.wait4) is not used: on Linux it keeps the parent's high-water mark
# across fork + exec, so children of a large process (run_all.py) would report at least the parent's size.
AION_CLI = """
import atexit, sys
def _peak():
    try:
        kb = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]
    except (OSError, StopIteration):
        return
    sys.stderr.write(f"\\nPEAK_KB {kb}\\n")
atexit.register(_peak)
from aion.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_child(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(seconds, peak RSS MiB, exit code) of one command in its own process (its PEAK_KB line, else ru_maxrss)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read().decode() if proc.stderr else ""  # read before waiting: a full pipe would block it
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        shown = " ".join("aion" if c == AION_CLI else c for c in cmd)
        raise SystemExit(f"{shown} failed ({proc.returncode}):\n{err[-2000:]}")
    peaks = [line.split()[1] for line in err.splitlines() if line.startswith("PEAK_KB ")]
    return seconds, (int(peaks[-1]) if peaks else usage.ru_maxrss) / 1024, proc.returncode


def count_objects(root: Path) -> int:
    from aion.data.mmu import SurveyShards

    return len(SurveyShards(root, "legacysurvey"))


def measure(model: Path, tokenizers: Path, roots: list[Path], threads: int = 1, batch_size: int = 256,
            target: str = "desi_z", device: str = "cpu") -> list[dict]:
    """``aion embed`` and ``aion predict`` on every root, each in a fresh process (so peak RSS is its own).

    Returns one dict per run: data, command, objects, seconds (with start-up), obj_per_s, peak_rss_mib."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    aion = [sys.executable, "-c", AION_CLI]
    common = ["--model", str(model), "--tokenizers", str(tokenizers), "--batch-size", str(batch_size),
              "--device", device, "--quiet"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for root in roots:
            n = count_objects(root)
            jobs = [("embed", ["embed", *common, "--data", str(root), "--out", f"{tmp}/e.parquet"]),
                    (f"predict {target}", ["predict", *common, "--data", str(root), "--target", target,
                                           "--out", f"{tmp}/p.parquet"])]
            for label, cmd in jobs:
                seconds, peak, _ = run_child([*aion, *cmd, "--restart"], env)
                rows.append({"data": root, "command": label, "objects": n, "seconds": seconds,
                             "obj_per_s": n / seconds, "peak_rss_mib": peak})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--tokenizers", type=Path, required=True)
    ap.add_argument("--data", type=Path, nargs="+", required=True, help="MMU roots, smallest first")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each child (OMP_NUM_THREADS)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cpu", help="device of the children (cpu, cuda)")
    ap.add_argument("--target", default="desi_z", help="scalar target of `aion predict`")
    ap.add_argument("--generate-target", default="desi_spectrum")
    ap.add_argument("--generate-limit", type=int, default=256, help="0 = skip generate")
    args = ap.parse_args()

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    aion = [sys.executable, "-c", AION_CLI]
    common = ["--model", str(args.model), "--tokenizers", str(args.tokenizers), "--batch-size",
              str(args.batch_size), "--device", args.device, "--quiet"]
    print(f"# {describe_machine()}; children use {args.threads} thread(s), device {args.device}")
    print(f"# model {args.model}, tokenizers {args.tokenizers}, batch {args.batch_size}")
    print(f"{'data':<28} {'command':<26} {'objects':>8} {'seconds':>8} {'obj/s':>8} {'peak RSS MiB':>13}")
    for r in measure(args.model, args.tokenizers, args.data, args.threads, args.batch_size, args.target,
                     args.device):
        print(f"{str(r['data']):<28} {r['command']:<26} {r['objects']:>8} {r['seconds']:>8.1f} "
              f"{r['obj_per_s']:>8.1f} {r['peak_rss_mib']:>13.0f}", flush=True)
    if args.generate_limit:
        with tempfile.TemporaryDirectory() as tmp:
            root = args.data[0]
            n = min(args.generate_limit, count_objects(root))
            sub = Path(tmp) / "first_rows"
            _first_rows(root, sub, n)
            cmd = ["generate", *common, "--data", str(sub), "--target", args.generate_target,
                   "--out", f"{tmp}/g.parquet", "--restart"]
            seconds, peak, _ = run_child([*aion, *cmd], env)
            label = f"generate {args.generate_target}"
            print(f"{str(root) + f' [:{n}]':<28} {label:<26} {n:>8} {seconds:>8.1f} {n / seconds:>8.2f} "
                  f"{peak:>13.0f}", flush=True)


def _first_rows(root: Path, out: Path, n: int) -> None:
    """An MMU root with the first ``n`` Legacy Survey rows and links to every other survey (the
    cross-match then finds the same partners)."""
    from aion.data.mmu import MMUShardWriter, SurveyShards

    out.mkdir(parents=True)
    for survey_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if survey_dir.name != "legacysurvey":
            os.symlink(survey_dir.resolve(), out / survey_dir.name)
            continue
        shards = SurveyShards(root, "legacysurvey")
        rows = shards.read_rows(list(range(n)))
        rel = shards.paths[0].relative_to(root)
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with MMUShardWriter(target) as w:
            w.append(rows)


if __name__ == "__main__":
    main()
