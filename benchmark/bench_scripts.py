"""Seconds per sampled image and per reward query of all eight scripts on `tiny` (CPU or GPU), printed as a table.

Each script runs in a fresh process at bench_speed.SETTINGS, the same for every script: T = 20 DDIM steps and 32
sampled images per run (RL scripts: 2 batches of 16; gradient scripts: 8 updates of 4). The figure is the training
loop (model loading, the step-0 sample grid and saving excluded), as wall-clock seconds and as the process's CPU
seconds (steadier on a busy machine; with one thread they agree on an idle one). `--fast` adds the opt-in speed flags
(bench_speed.FAST: --timesteps-per-call 20 for DDPO-SF, DDPO-IS and GRPO, --no-unet-checkpointing for the gradient
scripts), so that the table shows both columns of docs/speed/README.md's before/after.

    python benchmark/bench_scripts.py [--fast] [--threads 1] [--scripts ddpo_is alignprop]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import FAST, ROOT, SETTINGS, child  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fast", action="store_true", help="with the opt-in speed flags")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS (0: torch's default)")
    p.add_argument("--scripts", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS))
    args = p.parse_args()
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    print(f"{'script':13s} {'lines':>5s} {'s/image':>8s} {'CPU s/image':>11s} {'s/query':>8s}  settings (tiny, T=20)")
    for script in args.scripts:
        extra = FAST.get(script, []) if args.fast else []
        r = child([sys.executable, str(ROOT / "benchmark" / "bench_speed.py"), "measure", script, *extra], env)
        lines = len((ROOT / f"{script}.py").read_text().splitlines())
        print(f"{script + '.py':13s} {lines:5d} {r['wall_per_image']:8.3f} {r['cpu_per_image']:11.3f} "
              f"{r['wall_per_query']:8.3f}  {' '.join(SETTINGS[script] + extra)}", flush=True)


if __name__ == "__main__":
    main()
