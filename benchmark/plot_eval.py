"""Plot a run's sample-grid metrics over training: the training reward, held-out rewards and diversity.

    python benchmark/plot_eval.py RUN_DIR --output curves.png

Reads RUN_DIR/eval.jsonl (one row per sample grid: `eval_reward`, `eval/<name>`, `eval/diversity`) and draws one
panel per key against the step. It is how a reward-hacking collapse looks in numbers: the training reward rising
while `eval/diversity` (and possibly a held-out reward) falls.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "eval.jsonl"
    if not path.is_file():
        raise SystemExit(f"plot_eval.py: error: {path}: no such file (is {run_dir} a run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--output", type=Path, required=True, help="the PNG to write")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    rows = read_rows(args.run_dir)
    keys = ["eval_reward"] + sorted({k for r in rows for k in r if k.startswith("eval/")})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*points), marker="o", markersize=3)
        ax.set_title("training reward (grid mean)" if key == "eval_reward" else key, fontsize=10)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    fig.suptitle(args.title or str(args.run_dir), fontsize=10)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
