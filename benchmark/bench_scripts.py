"""Seconds per optimizer step of each script on `--model tiny` (CPU or GPU), printed as a table.

Each script runs through its real command line in a subprocess with small settings (T = 10 DDIM steps);
the figure is the mean of `step_seconds` in its metrics.jsonl over the steps after the first, so model
loading and the first step's warm-up are excluded. DDPO-IS and RWR take several updates per sampled batch
(2 here); their figure averages the steps that sample and the update-only steps, i.e. it is the cost of a
batch divided by its updates.

    python benchmark/bench_scripts.py [--steps 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--model", "tiny", "--num-inference-steps", "10", "--sample-every", "1000", "--save-every", "0"]
RL = ["--reward", "jpeg_compressibility", "--batch-size", "8", "--sample-batch-size", "8", "--train-batch-size", "4"]
GRAD = ["--reward", "jpeg_compressibility_diff", "--batch-size", "4"]
CONFIGS = {
    "ddpo_sf.py": RL,
    "ddpo_is.py": RL + ["--num-minibatches", "2"],
    "rwr.py": RL + ["--num-minibatches", "2", "--num-epochs", "1", "--images-per-prompt", "4"],
    "draft.py": GRAD + ["--k", "1"],
    "draft_lv.py": GRAD,
    "refl.py": GRAD + ["--max-step", "5"],
    "alignprop.py": GRAD,
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=7)
    args = p.parse_args()
    print(f"{'script':14s} {'lines':>5s} {'s/step':>7s}  settings (tiny, T=10)")
    for script, extra in CONFIGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, str(ROOT / script), *COMMON, *extra, "--steps", str(args.steps),
                   "--output-dir", f"{tmp}/run"]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
        seconds = statistics.mean(r["step_seconds"] for r in rows[1:])
        lines = len((ROOT / script).read_text().splitlines())
        print(f"{script:14s} {lines:5d} {seconds:7.2f}  {' '.join(extra)}")


if __name__ == "__main__":
    main()
