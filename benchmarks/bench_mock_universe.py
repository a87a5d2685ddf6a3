"""Mock-universe generation throughput and peak memory at several sizes.

Each size runs in a fresh subprocess so its peak resident memory is its own. Memory must
stay flat as N grows (the generator writes chunk by chunk); throughput is galaxies/s.

    python benchmarks/bench_mock_universe.py            # N = 2,000 and 20,000
    python benchmarks/bench_mock_universe.py --n 500 2000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Peak memory is the child's VmHWM (this process image's high-water mark, in KiB). Not ru_maxrss: on Linux
# that keeps the parent's high-water mark across fork + exec, so a child of a large process (run_all.py)
# would report at least the parent's size.
CHILD = """
import json, resource, sys, time
from aion.mock.universe import MockConfig, generate
t = time.perf_counter()
s = generate(sys.argv[1], MockConfig(n=int(sys.argv[2]), seed=int(sys.argv[3])), progress=False)
try:
    peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) / 1024
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB
print(json.dumps({"seconds": time.perf_counter() - t, "counts": s.counts, "peak_mb": peak}))
"""


def machine() -> str:
    import numpy
    import torch

    return (f"{platform.node()} | {platform.processor() or platform.machine()} | {os.cpu_count()} CPUs | "
            f"python {platform.python_version()} | numpy {numpy.__version__} | torch {torch.__version__}")


def run(n: int, seed: int, workdir: Path, keep: bool = False) -> dict:
    """Generate N galaxies under ``workdir`` in a fresh process; ``keep`` leaves the data there
    (``path``) for later benchmarks instead of deleting it."""
    out = workdir / f"mock_{n}"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(out), str(n), str(seed)],
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"generation of N={n} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    if not keep:
        shutil.rmtree(out)
    return {"n": n, "generate_s": result["seconds"], "wall_s": wall, "gal_per_s": n / result["seconds"],
            "peak_rss_mb": result["peak_mb"],
            "disk_mb": disk / 1e6, "counts": result["counts"], "path": out if keep else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()
    print(f"# mock-universe benchmark | {machine()}")
    print(f"# command: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
    print(f"{'N':>8} {'seconds':>9} {'gal/s':>8} {'peak RSS MB':>12} {'disk MB':>9}  objects per survey")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in args.n:
            r = run(n, args.seed, Path(tmp))
            counts = ", ".join(f"{k}={v}" for k, v in r["counts"].items() if k != "truth")
            print(f"{r['n']:>8} {r['generate_s']:>9.1f} {r['gal_per_s']:>8.1f} {r['peak_rss_mb']:>12.0f} "
                  f"{r['disk_mb']:>9.0f}  {counts}", flush=True)


if __name__ == "__main__":
    main()
