"""The benchmark's outputs from its run directories: lr_sweep.csv and its plot, runs.csv, plots, before/after grids,
summary.md/.json.

Called by compare.py after every finished run (so partial results are always on disk) and at the end.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from benchmark import analysis

ROOT = Path(__file__).resolve().parents[1]
# where an RL stage finds the main comparison's gradient runs: a local benchmark run first, then the published one
REFERENCE_SUMMARIES = (ROOT / "benchmark" / "results" / "summary.json", ROOT / "docs" / "benchmark" / "summary.json")
COLORS = dict(ddpo_sf="tab:red", ddpo_is="tab:orange", rwr="tab:brown", draft="tab:blue", draft_lv="tab:green",
              refl="tab:purple", alignprop="tab:cyan", grpo="tab:olive")
GRID_POINTS = 80


def _label(algo: str) -> str:
    return analysis.LABELS[algo]


def _style(algo: str) -> dict:
    return dict(color=COLORS[algo], linestyle="--" if algo in analysis.RL else "-")


def _fmt(mean_std, digits=3) -> str:
    m, s = mean_std
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "–"
    return f"{m:.{digits}g} ± {s:.2g}"


def _groups(c, runs_by_algo) -> dict[str, list[str]]:
    """Training reward -> the algorithms trained on it (in the comparison's order)."""
    groups: dict[str, list[str]] = {}
    for algo in c.algorithms:
        if runs_by_algo.get(algo):
            groups.setdefault(c.reward(algo), []).append(algo)
    return groups


def _plot_band(ax, grid, curves, algo):
    b = analysis.band(curves)
    ok = b["n"] > 0
    if not ok.any():
        return
    ax.plot(grid[ok], b["mean"][ok], label=f"{_label(algo)} (n={int(b['n'][ok].max())})", **_style(algo))
    ax.fill_between(grid[ok], b["min"][ok], b["max"][ok], color=COLORS[algo], alpha=0.15, linewidth=0)


def plot_comparison(c, runs_by_algo: dict[str, list[analysis.Run]], out: Path) -> list[Path]:
    """Two figures: reward vs reward queries and vs train seconds. One row per training reward; left the
    smoothed training reward of the sampled batches, right the fixed-grid eval gain. Lines: mean over seeds;
    shading: min–max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(c, runs_by_algo)
    if not groups:
        return []
    window = 0.2 * c.budget
    paths = []
    for axis, xlabel in (("queries", "reward queries (images scored)"),
                         ("seconds", "train seconds (sum of step_seconds)")):
        fig, axes = plt.subplots(len(groups), 2, figsize=(12, 4.2 * len(groups)), squeeze=False)
        for row, (reward, algos) in enumerate(groups.items()):
            ax_train, ax_eval = axes[row]
            for algo in algos:
                runs = runs_by_algo[algo]
                tc = [analysis.train_curve(r, window) for r in runs]
                if axis == "queries":
                    xmax = c.budget
                    curves_x = [(q, y) for q, _, y in tc]
                else:
                    xmax = min(s[-1] for _, s, _ in tc if len(s))
                    curves_x = [(s, y) for _, s, y in tc]
                grid = np.linspace(0, xmax, GRID_POINTS)
                _plot_band(ax_train, grid, [analysis.on_grid(x, y, grid) for x, y in curves_x], algo)
                _plot_band(ax_eval, grid, [analysis.on_grid(*analysis.gain_curve(r, axis), grid) for r in runs], algo)
            ax_train.set_title(f"training batches (trailing mean, {window:g} queries)", fontsize=10)
            ax_eval.set_title("eval grid: gain over step 0 (fixed prompts and noise)", fontsize=10)
            for ax in (ax_train, ax_eval):
                ax.set_xlabel(xlabel)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
            ax_train.set_ylabel(reward)
            ax_eval.set_ylabel(f"Δ {reward}")
            ax_eval.axhline(0, color="k", lw=0.5)
        fig.suptitle(f"{c.title}\nmean over seeds, shading min–max; dashed: RL (black-box reward), solid: gradient",
                     fontsize=10)
        fig.tight_layout()
        path = out / f"{c.name}_reward_vs_{axis}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def before_after(c, job_of: dict, out: Path) -> list[Path]:
    """Per algorithm, the step-0 and final sample grids of seed 0 side by side, labelled with the grid's mean
    reward and the prompts of the grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for algo in c.algorithms:
        job = job_of.get((algo, min(c.seeds)))
        if job is None:
            continue
        grids = sorted((job.run_dir / "samples").glob("step_*.png"))
        if len(grids) < 2 or not (job.run_dir / "pytorch_lora_weights.safetensors").is_file():
            continue
        evals = {int(e["step"]): e["eval_reward"] for e in analysis.read_jsonl(job.run_dir / "eval.jsonl")}
        first, last = grids[0], grids[-1]
        h, w = plt.imread(first).shape[:2]
        fig, axes = plt.subplots(1, 2, figsize=(10, 5 * h / w + 1.6))
        for ax, path, when in ((axes[0], first, "before"), (axes[1], last, "after")):
            step = int(path.stem.split("_")[1])
            ax.imshow(plt.imread(path), interpolation="nearest")
            r = evals.get(step)
            ax.set_title(f"{when}: step {step}" + (f", grid {c.reward(algo)} = {r:.3g}" if r is not None else ""),
                         fontsize=9)
            ax.axis("off")
        prompts_file = Path(job.cmd[job.cmd.index("--prompt-file") + 1])
        prompts = prompts_file.read_text().splitlines()[: c.num_sample_images] if prompts_file.is_file() else []
        text = "; ".join(f"{i + 1}. {p}" for i, p in enumerate(prompts))
        fig.suptitle(f"{_label(algo)}, seed {job.seed}, {c.name} comparison ({job.steps} updates, "
                     f"{c.budget} reward queries)", fontsize=11)
        fig.text(0.5, 0.01, "grid prompts (row by row): " + text, ha="center", va="bottom", fontsize=6.5, wrap=True)
        fig.tight_layout(rect=(0, 0.1, 1, 0.95))
        path = out / "grids" / c.name / f"{algo}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _config_table(c, jobs) -> list[str]:
    seen = {}
    for j in jobs:
        if j.comparison is c and j.algorithm not in seen:
            seen[j.algorithm] = j
    lines = ["| algorithm | script | reward | batch | steps | LR | T | w | budget (queries) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for algo, j in seen.items():
        e = j.extra
        batch = e["batch"] + (f"; clip range {e['clip_range']:.3g}" if "clip_range" in e else "") \
            + (f"; `{e['flags']}`" if "flags" in e else "")
        lines.append(f"| {_label(algo)} | `{algo}.py` | `{e['reward']}` | {batch} | {e['steps']} | {e['lr']:g} | "
                     f"{e['T']} | {e['w']:g} | {e['budget']} |")
    return lines


def _eta(c, algo: str) -> float:
    """The sampler `algo` trains and is evaluated with in comparison `c` (its base model's too)."""
    return c.rl_eta if algo in analysis.RL else 0.0


def final_delta(c, algo: str, entry: dict, base: dict) -> tuple[float, float]:
    """The final evaluation's own training reward on the training prompts minus the base model's under the same
    sampler (mean ± std over seeds); NaN when either is missing."""
    reward = c.reward(algo)
    fe = entry.get("final_eval", {}).get("train", {}).get(reward)
    b = base.get(_eta(c, algo))
    if fe is None or b is None or reward not in b["scores"]["train"]:
        return math.nan, math.nan
    return fe[0] - b["scores"]["train"][reward], fe[1]


def _results_table(c, summary, base) -> list[str]:
    """Reward and cost per algorithm."""
    head = ["algorithm", "LR", "seeds", "reward", "final Δ reward vs base (test split)", "final eval-grid gain",
            "train reward, last 10%", "queries to threshold (reached)", "grid diversity, start → end", "s / update",
            "s / 1k queries", "wall s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for algo in c.algorithms:
        e = summary["algorithms"].get(algo)
        if e is None:
            continue
        q = e.get("queries_to_threshold_mean")
        d0, d1 = e["grid_diversity_start_final"] or (math.nan, math.nan)
        cells = [_label(algo), "/".join(f"{lr:g}" for lr in c.lr.get(algo, [])), ",".join(map(str, e["seeds"])),
                 f"`{c.reward(algo)}`", _fmt(final_delta(c, algo, e, base)), _fmt(e["final_gain_mean_std"]),
                 _fmt(e["train_reward_last_mean_std"]),
                 (f"{q:.0f}" if q is not None else "not reached") + f" ({e.get('reached_threshold', '–')})",
                 "–" if math.isnan(d0) else f"{d0:.3f} → {d1:.3f}",
                 f"{e['seconds_per_update']:.2f}", f"{e['seconds_per_1k_queries']:.0f}",
                 f"{e['wall_seconds_per_run']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _eval_table(c, summary, base) -> list[str]:
    """The final evaluation (benchmark/evaluate.py) per algorithm and for the base model."""
    em = list(c.eval_rewards)
    head = ["model", "sampler"] + [f"{r} train" for r in em] + [f"{r} held-out" for r in em]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for eta, b in sorted(base.items()):
        cells = ["base model", f"η = {eta:g}"]
        cells += [f"{b['scores'][split].get(r, math.nan):.3g}" for split in ("train", "heldout") for r in em]
        lines.append("| " + " | ".join(cells) + " |")
    for algo in c.algorithms:
        e = summary["algorithms"].get(algo)
        if e is None:
            continue
        fe = e.get("final_eval", {})
        cells = [_label(algo), f"η = {_eta(c, algo):g}"]
        cells += [_fmt(fe.get("train", {}).get(r, (math.nan, math.nan))) for r in em]
        cells += [_fmt(fe.get("heldout", {}).get(r, (math.nan, math.nan))) for r in em]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def load_base(out: Path, c) -> dict[float, dict]:
    """η -> the base model's evaluation on the comparison's split (compare.evaluate_base's files)."""
    base = {}
    for path in sorted((out / "base").glob(f"{c.name}__{c.split}__eta*.json")):
        b = json.loads(path.read_text())
        base[b["config"]["eta"]] = b
    return base


def sweep_scores(runs: dict) -> dict[str, dict[float, float]]:
    """algorithm -> {learning rate: validation score} from the sweep's evaluated runs ({job: Run})."""
    scores: dict[str, dict[float, float]] = {}
    for job, run in runs.items():
        if run.final_eval:
            reward = job.comparison.reward(job.algorithm)
            scores.setdefault(job.algorithm, {})[job.lr] = run.final_eval["scores"]["train"][reward]
    return scores


def plot_sweep(c, scores: dict[str, dict[float, float]], base: dict, out: Path) -> Path | None:
    """Validation score minus the base model's (same sampler) against the learning rate, one line per algorithm,
    the chosen rate marked with a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not scores:
        return None
    chosen = analysis.choose_rates(scores)
    drawn = [algo for algo in c.algorithms if algo in scores and _eta(c, algo) in base]
    if not drawn:  # the base model's evaluation is needed for the Δ
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for algo in drawn:
        b = base[_eta(c, algo)]["scores"]["train"][c.reward(algo)]
        rates = sorted(scores[algo])
        ax.plot(rates, [scores[algo][lr] - b for lr in rates], marker="o", label=_label(algo), **_style(algo))
        if algo in chosen:
            ax.plot([chosen[algo]], [scores[algo][chosen[algo]] - b], marker="*", markersize=16, color=COLORS[algo],
                    markeredgecolor="k", linestyle="none")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xscale("log")
    ticks = sorted({lr for by_rate in scores.values() for lr in by_rate})
    ax.set_xticks(ticks, [f"{lr:g}" for lr in ticks])
    ax.minorticks_off()
    ax.set_xlabel("AdamW learning rate")
    ax.set_ylabel(f"validation Δ {c.grad_reward} vs base model")
    ax.set_title(f"learning-rate sweep: {c.budget} reward queries, seed {c.seeds[0]}, validation split "
                 f"({c.eval_images} images); ★ chosen\ndashed: RL (η = 1 base), solid: gradient (η = 0 base)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path = out / "lr_sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _sweep_section(c, runs: dict, scores: dict, base: dict) -> list[str]:
    """summary.md's sweep table: per algorithm and rate the validation Δ vs base (chosen in bold), and the clip
    fraction of DDPO-IS and GRPO (how often the scaled clip range acted)."""
    chosen = analysis.choose_rates(scores)
    rates = sorted({lr for by_rate in scores.values() for lr in by_rate})
    lines = ["| algorithm | " + " | ".join(f"{lr:g}" for lr in rates) + " | chosen |",
             "|---|" + "---|" * (len(rates) + 1)]
    clipfrac = {}
    for job, run in runs.items():
        values = [m["clipfrac"] for m in run.metrics if "clipfrac" in m]
        if values:
            clipfrac[(job.algorithm, job.lr)] = float(np.mean(values))
    for algo in c.algorithms:
        if algo not in scores:
            continue
        b = base.get(_eta(c, algo), {}).get("scores", {}).get("train", {}).get(c.reward(algo), math.nan)
        cells = []
        for lr in rates:
            if lr not in scores[algo]:
                cells.append("")
                continue
            text = f"{scores[algo][lr] - b:+.2f}"
            if (algo, lr) in clipfrac:
                text += f" (clip {clipfrac[(algo, lr)]:.2f})"
            cells.append(f"**{text}**" if chosen.get(algo) == lr else text)
        lines.append(f"| {_label(algo)} | " + " | ".join(cells) + f" | {chosen.get(algo, math.nan):g} |")
    return lines


def final_deltas(c, runs: dict, base: dict) -> dict[str, list[float]]:
    """algorithm -> per-seed final Δ of its training reward vs the base model (same sampler), test split, from the
    runs ({job: Run}) that have a final evaluation; an algorithm without the base model's score is left out."""
    finals: dict[str, list[tuple[int, float]]] = {}
    for job, run in runs.items():
        reward = c.reward(job.algorithm)
        b = base.get(_eta(job.comparison, job.algorithm), {}).get("scores", {}).get("train", {}).get(reward)
        if run.final_eval and b is not None:
            finals.setdefault(job.algorithm, []).append((job.seed, run.final_eval["scores"]["train"][reward] - b))
    return {algo: [v for _, v in sorted(seeds)] for algo, seeds in finals.items()}


def gradient_reference(c) -> tuple[dict[str, analysis.Sample], int, str] | str:
    """The gradient scripts' final Δ of the stage's reward vs the base model (η = 0) in the main comparison on the
    same task and model (`c.claims_against`), from the first of REFERENCE_SUMMARIES that has it: ({algorithm:
    Sample}, its budget, the file); otherwise the reason, for the report."""
    reward = c.rl_reward
    for path in REFERENCE_SUMMARIES:
        comp = (analysis.read_json(path) or {}).get("comparisons", {}).get(c.claims_against)
        if not comp or comp.get("model") != c.model or "summary" not in comp:
            continue
        base = comp.get("base", {}).get("0.0", {}).get("scores", {}).get("train", {}).get(reward)
        if base is None:
            continue
        samples = {}
        for algo, e in comp["summary"]["algorithms"].items():
            fe = e.get("final_eval", {}).get("train", {}).get(reward)
            if algo not in analysis.RL and fe is not None:
                samples[algo] = analysis.Sample.from_population_std(fe[0] - base, fe[1], len(e["seeds"]))
        if samples:
            return samples, comp["budget"], _rel(path)
    return (f"not in this stage: no summary.json of the main comparison `{c.claims_against}` on `{c.model}` with "
            f"the gradient scripts' final `{reward}` (looked in "
            + ", ".join(f"`{_rel(p)}`" for p in REFERENCE_SUMMARIES) + ")")


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _sample(s: analysis.Sample) -> str:
    return "–" if s.n == 0 else f"{s.mean:+.3g} ± {s.sd:.2g} ({s.n})" if s.n > 1 else f"{s.mean:+.3g} (1)"


def _claims_section(c, finals: dict[str, list[float]]) -> tuple[list[str], list[dict]]:
    """summary.md's claims table of an RL stage and its rows (for summary.json)."""
    rows = analysis.rl_claims(finals)
    ref = gradient_reference(c)
    if not isinstance(ref, str):
        samples, budget, where = ref
        rows += analysis.gradient_claims(finals, samples, c.budget, budget)
    lines = ["### Claims", "",
             "| claim | A: final Δ (± sd, seeds) | B: final Δ | A − B | SE | verdict |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        se = "–" if math.isnan(r["se"]) else f"{r['se']:.2g}"
        lines.append(f"| {r['claim']} | {_label(r['a'])} {_sample(r['sample_a'])} | {_label(r['b'])} "
                     f"{_sample(r['sample_b'])} | {r['diff']:+.3g} | {se} | {r['verdict']} |")
    if not rows:
        lines.append("| (no algorithm pair with evaluated runs yet) | | | | | |")
    lines += ["", f"Final Δ: the final evaluation's `{c.rl_reward}` on the test half of `{c.prompts}` minus the base "
              "model's with the same sampler, per seed; A − B the difference of the means over seeds; SE the "
              "standard error of that difference for independent seeds, √(sd_A²/n_A + sd_B²/n_B) with sd the "
              f"sample std (ddof 1); **resolved when |A − B| > {analysis.RESOLVE_SE:g} SE** (a rough test: "
              "with 3 seeds a side Welch's t has about 4 degrees of freedom, at which |t| > 2 happens by chance "
              "about 12% of the time, not 5%); *agrees* / *contradicts*: resolved "
              "in the claim's direction / against it; *not resolved*: within the seeds' spread."]
    if isinstance(ref, str):
        lines += ["", f"Per reward query against the gradient scripts: {ref}."]
    else:
        lines += ["", f"Per reward query against the gradient scripts: their final Δ of `{c.rl_reward}` (η = 0 "
                  f"base) at {budget} reward queries from the main comparison `{c.claims_against}` "
                  f"(`{where}`, its own evaluation images and seeds), against the best RL script of this stage at "
                  f"{c.budget}; choosing the best RL script after the fact favours RL. *Not shown*: the side ahead "
                  "had more queries, so the figures say nothing per query."]
    return lines + [""], rows


def write(comps, jobs, out: Path, elapsed: float | None, final: bool,
          title: str = "Benchmark: eight reward fine-tuning algorithms at an equal budget of reward queries") -> dict:
    """Write lr_sweep.csv/.png, runs.csv, the plots, the grids, summary.md and summary.json from what is in the run
    directories. `comps` may start with the sweep (a comparison on the validation split)."""
    runs_of: dict = {}  # job -> Run, finished runs only (compare.py stamps bench_run.json "finished" at the end)
    rows = []
    for j in jobs:
        if (j.run_dir / "metrics.jsonl").is_file():
            run = analysis.load_run(j.run_dir, j.comparison.name, j.algorithm, j.seed, j.comparison.split)
            if run.metrics and "finished" in (run.info or {}):
                runs_of[j] = run
                rows += analysis.csv_rows(run, j.lr)
    analysis.write_csv(rows, out / "runs.csv")

    result = dict(generated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), final=final,
                  invocation_seconds=None if elapsed is None else round(elapsed, 1), comparisons={})
    md = [f"# {title}", ""]
    md += [f"Generated {result['generated']} by `python benchmark/compare.py`"
           + ("" if final else " (**partial: the benchmark is still running**)") + ".", ""]
    total_wall = 0.0
    for c in comps:
        runs = {j: r for j, r in runs_of.items() if j.comparison is c}
        base = load_base(out, c)
        wall = sum(r.info.get("wall_seconds", 0) for r in runs.values()) + sum(
            (analysis.read_json(j.eval_file) or {}).get("seconds", 0) for j in jobs if j.comparison is c)
        wall += sum(b.get("seconds", 0) for b in base.values())
        total_wall += wall
        expected = sum(len(c.lr.get(a, [])) for a in c.algorithms) * len(c.seeds)
        info = dict(title=c.title, model=c.model, prompts=c.prompts, heldout_prompts=c.heldout_prompts,
                    budget=c.budget, seeds=c.seeds, split=c.split, num_inference_steps=c.num_inference_steps,
                    guidance_scale=c.guidance_scale, lr=c.lr, runs_finished=len(runs), runs_expected=expected,
                    wall_seconds=round(wall, 1), base={str(k): v for k, v in base.items()},
                    commands=[f"OMP_NUM_THREADS=1 python {' '.join(j.cmd)}" for j in jobs if j.comparison is c])
        result["comparisons"][c.name] = info
        if c.sweep:
            scores = sweep_scores(runs)
            sweep_rows = analysis.sweep_rows(scores, c.seeds[0], analysis.LABELS)
            analysis.write_csv(sweep_rows, out / "lr_sweep.csv", analysis.SWEEP_COLUMNS)
            plot = plot_sweep(c, scores, base, out)
            info |= dict(rows=sweep_rows, chosen=analysis.choose_rates(scores))
            md += [f"## Stage 1: {c.title}", ""]
            md += [f"{len(runs)} of {expected} runs finished; seed {c.seeds[0]}; budget {c.budget} reward queries per "
                   f"run; scored on the {c.split} split ({c.eval_images} images of the validation half of "
                   f"`{c.prompts}`, initial noise from seeds 20000+); wall time of its runs and evaluations {wall / 60:.1f} min.",
                   ""]
            md += _sweep_section(c, runs, scores, base) + [""]
            md += ["Cells: the final LoRA's mean training reward on the validation split minus the base model's with "
                   "the same sampler (η = 1 for the RL scripts, 0 for the gradient scripts); bold: the chosen rate, "
                   "the best validation score (ties: the smaller rate); *clip*: DDPO-IS's and GRPO's mean clip "
                   "fraction over the run's updates. Data: [`lr_sweep.csv`](lr_sweep.csv).", ""]
            if plot:
                md += [f"![{plot.stem}]({plot.relative_to(out)})", ""]
            md += ["<details><summary>Command lines</summary>", "", "```"] + info["commands"]
            md += ["```", "", "</details>", ""]
            continue

        by_algo: dict[str, list[analysis.Run]] = {}
        for r in runs.values():
            by_algo.setdefault(r.algorithm, []).append(r)
        summary = analysis.summarize(list(runs.values()), {a: c.reward(a) for a in c.algorithms})
        plots = plot_comparison(c, by_algo, out)
        job_of = {(j.algorithm, j.seed): j for j in jobs if j.comparison is c}
        grids = before_after(c, job_of, out)
        info |= dict(summary=summary,
                     config={j.algorithm: j.extra for j in jobs if j.comparison is c and j.seed == min(c.seeds)})

        md += [f"## Comparison `{c.name}`: {c.title}", ""]
        md += [f"{len(runs)} of {expected} runs finished; seeds {c.seeds}; budget {c.budget} reward queries per run; "
               f"T = {c.num_inference_steps}, w = {c.guidance_scale:g}; evaluated on the {c.split} split; wall time "
               f"of its runs and evaluations {wall / 60:.1f} min.", ""]
        if c.claims_against:
            swept = any(x.sweep for x in comps)
            md += ["Learning rates: " + ("chosen by this stage's sweep (stage 1 above: its budget, the validation "
                                         "split, one seed)." if swept else
                                         "fixed, not chosen at this budget: the main comparison's sweep's choices at "
                                         "192 queries (compare.STAGE_LR) unless `--lr` set one; DDPO-SF's and RWR's "
                                         "1e-5 is that sweep's lower limit, where nothing moved. `--stage-sweep` "
                                         "chooses them at this budget."), ""]
        md += ["### Configuration", ""] + _config_table(c, jobs) + [""]
        for algo, e in summary["algorithms"].items():
            e["final_delta_vs_base"] = final_delta(c, algo, e, base)
        md += ["### Results", ""] + _results_table(c, summary, base) + [""]
        md += ["Columns (± is the std over seeds): *LR* the learning rate chosen by the sweep (or fixed by `--lr`); *final Δ reward vs "
               f"base* is the final evaluation's mean training reward on about {c.eval_images} images of the test "
               "half of the training prompts minus the base model's on the same prompts and seeds with the same "
               "sampler; *final eval-grid gain* is the script's own sample grid "
               f"({c.num_sample_images} images: the first {c.num_sample_images // 2} prompts of the training file, "
               "test-split captions, × seeds 0 and 1, its sampler) at the end minus at step 0, the curve the "
               "threshold is read from; *train reward, last 10%* is the mean reward of the batches sampled in the "
               "last 10% of the budget (ReFL: of its one-step predictions x̂0, not of finished samples; DRaFT-LV: "
               "of x0, not of the re-noised copies); *grid diversity* is the grid's `eval/diversity` (mean "
               "pairwise RMS pixel distance between the two seeds of a prompt) at step 0 and at the end; "
               "*s / update* is the mean `step_seconds` (sampling, reward and update; DDPO-IS, GRPO and RWR average "
               "the updates that sample and those that reuse a batch).", ""]
        if c.claims_against:  # an RL stage: the papers' claims from the per-seed finals
            finals = final_deltas(c, runs, base)
            for algo, values in finals.items():
                summary["algorithms"][algo]["final_delta_per_seed"] = values
            claim_lines, claim_rows = _claims_section(c, finals)
            md += claim_lines
            info["claims"] = [{k: (v.__dict__ if isinstance(v, analysis.Sample) else v) for k, v in r.items()}
                              for r in claim_rows]
        md += ["### Final evaluation (test split)", ""] + _eval_table(c, summary, base) + [""]
        md += [f"About {c.eval_images} images per prompt set (the test halves of `{c.prompts}` = train and "
               f"`{c.heldout_prompts}` = held-out attribute combinations; every prompt of a half equally often; "
               "fixed seeds 10000+) from the final LoRA with the sampler it trained with: η = 0 for the gradient "
               f"scripts, η = {c.rl_eta:g} for the RL scripts{' (the flow SDE noise level a)' if c.rl_eta != 1 else ''}"
               ", and the base model with both. "
               "`shapes_exact_match` is the "
               "fraction of images whose four attributes (shape, colour, background, count) all match the prompt as "
               "the shapes classifier reads them, `shapes_attribute_accuracy` the mean fraction of the four that "
               "match.", ""]
        for reward, t in summary["threshold"].items():
            g = t["gain"]
            md.append(f"Threshold for `{reward}`: eval-grid gain ≥ {g:.3g}, {t['rule']} "
                      f"({_label(t['best_algorithm'])}, {t['best_final_gain']:.3g}); queries to threshold is the "
                      "first crossing of each seed's eval curve (linear between grid evaluations), averaged over the "
                      "seeds that reach it."
                      if g is not None else f"Threshold for `{reward}`: undefined (no algorithm improved).")
        md.append("")
        for p in plots:
            md += [f"![{p.stem}]({p.relative_to(out)})", ""]
        if grids:
            md += ["Before/after sample grids (seed 0): " + ", ".join(
                f"[{_label(g.stem)}]({g.relative_to(out)})" for g in grids), ""]
        md += ["<details><summary>Command lines</summary>", "", "```"]
        md += info["commands"] + ["```", "", "</details>", ""]
    result["wall_seconds_total"] = round(total_wall, 1)
    invocation = f"this invocation: {elapsed / 60:.1f} min" if elapsed is not None else "report regenerated"
    md.insert(3, f"Sum of the wall times of all runs and evaluations: {total_wall / 60:.1f} min ({invocation}). "
                 "Every job ran with `OMP_NUM_THREADS=1` on a shared 2-core CPU; timings vary with the load of the "
                 "machine.\n")
    (out / "summary.md").write_text("\n".join(md) + "\n")
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=float))
    return result
