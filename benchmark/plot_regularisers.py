"""Curves of several runs' (or checkpoint evaluations') sample-grid metrics against updates, one panel per metric:
the figure of docs/regularisers.md.

    python benchmark/plot_regularisers.py --output curves.png --json values.json \
        "DRaFT-1=RUN/checkpoint_eval.jsonl@weights=lora,scale=1" "KL β=1=RUN2/eval.jsonl" ...

Each curve is LABEL=FILE, a run's eval.jsonl or benchmark/checkpoint_eval.py's output, with an optional @key=value,…
filter on its rows (values compared as strings). --json writes the plotted values.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KEYS = ("eval_reward", "eval/shapes_exact_match", "eval/diversity")


def curve(spec: str) -> tuple[str, list[dict]]:
    head, _, filt = spec.partition("@")
    label, _, path = head.rpartition("=")  # a label may hold "=" (β=1), a path not
    want = dict(kv.split("=", 1) for kv in filt.split(",")) if filt else {}
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return label, sorted((r for r in rows if all(str(r.get(k)) == v for k, v in want.items())), key=lambda r: r["step"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("curves", nargs="+")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--title", default=None)
    args = p.parse_args()
    curves = [curve(s) for s in args.curves]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KEYS), figsize=(4.2 * len(KEYS), 3.4))
    for ax, key in zip(axes, KEYS):
        for label, rows in curves:
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o", ms=3, label=label)
        ax.set_xlabel("update")
        ax.set_title(key)
    axes[0].legend(fontsize=7)
    if args.title:
        fig.suptitle(args.title, fontsize=9)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    if args.json:
        args.json.write_text(json.dumps({label: [{k: r[k] for k in ("step", *KEYS)} for r in rows]
                                         for label, rows in curves}, indent=1) + "\n")


if __name__ == "__main__":
    main()
