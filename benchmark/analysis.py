"""The benchmark's data logic, without plotting or running anything: read run directories, build the per-update
CSV rows, curves on a common query grid, spread over seeds, thresholds and queries-to-threshold, the summary, and
the learning-rate sweep's choice.

Everything here works on plain files (metrics.jsonl, eval.jsonl, test_eval.json / validation_eval.json,
bench_run.json) so that it can be tested on synthetic runs (tests/test_benchmark.py).

Definitions used throughout (also stated in summary.md):
- the *eval curve* of a run is the script's own fixed-grid reward (`eval.jsonl`: the same prompts and initial
  noise at every evaluation, full samples with the script's sampler) against the reward queries spent when it
  was drawn; step 0 is the base model at 0 queries. Its *gain* is eval_reward − eval_reward at step 0, so the
  RL scripts (η = 1) and the gradient scripts (η = 0), whose base models score differently, are compared on
  how much they improved.
- the *threshold* of a group of algorithms trained on the same reward is half the best final gain: halfway
  between the base model (gain 0) and the best algorithm's mean final gain over seeds.
- *queries to threshold* of a run is the first crossing of its eval-gain curve, linearly interpolated between
  the two evaluations around it; runs that never reach it count as not reached.
- the *final evaluation* of a run is benchmark/evaluate.py's on one half of the prompts: `validation_eval.json`
  (the sweep's runs: it chooses the learning rate) or `test_eval.json` (the final table's runs: it is reported).
  `load_run` reads one of them, the test split unless told otherwise, so a table never mixes the two.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RL = ("ddpo_sf", "ddpo_is", "rwr", "grpo")  # the scripts that score under no_grad (the rest backpropagate rewards)
LABELS = dict(ddpo_sf="DDPO-SF", ddpo_is="DDPO-IS", rwr="RWR", draft="DRaFT-1", draft_lv="DRaFT-LV", refl="ReFL",
              alignprop="AlignProp", grpo="GRPO")
CSV_COLUMNS = ["comparison", "algorithm", "learning_rate", "seed", "step", "reward_queries", "seconds",
               "train_seconds", "step_seconds", "reward_mean", "eval_reward"]
SWEEP_COLUMNS = ["algorithm", "learning_rate", "seed", "validation_score", "chosen"]


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file; [] when it does not exist. A truncated last line (a run killed mid-write) is
    skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_json(path: Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass
class Run:
    """One training run as the benchmark sees it."""

    comparison: str
    algorithm: str
    seed: int
    metrics: list[dict]  # metrics.jsonl: one row per optimizer update
    evals: list[dict]  # eval.jsonl: {"step", "eval_reward"} for each sample grid, step 0 = base model
    final_eval: dict | None = None  # {split}_eval.json written by benchmark/evaluate.py
    info: dict = field(default_factory=dict)  # bench_run.json written by compare.py (command, wall time)

    @property
    def budget_spent(self) -> int:
        return int(self.metrics[-1]["reward_queries"]) if self.metrics else 0


def load_run(run_dir: Path, comparison: str, algorithm: str, seed: int, split: str = "test") -> Run:
    """A run directory with the final evaluation of `split` ("test" or "validation"), none if that is missing."""
    run_dir = Path(run_dir)
    final = read_json(run_dir / f"{split}_eval.json")
    if final is not None and final.get("config", {}).get("split", split) != split:
        raise ValueError(f"{run_dir}: {split}_eval.json holds the {final['config']['split']} split")
    return Run(comparison, algorithm, seed, read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "eval.jsonl"),
               final, read_json(run_dir / "bench_run.json") or {})


def csv_rows(run: Run, learning_rate: float | str = "") -> list[dict]:
    """Per-update rows of one run (CSV_COLUMNS), plus a step-0 row for the base model's eval reward.

    `seconds` is the script's own clock (since it started, model loading and sample grids included);
    `train_seconds` is the cumulative `step_seconds` (sampling, reward and update only), the wall-clock axis of
    the plots. `eval_reward` is filled on the updates after which a sample grid was drawn."""
    evals = {int(e["step"]): e["eval_reward"] for e in run.evals}
    base = dict(comparison=run.comparison, algorithm=run.algorithm, learning_rate=learning_rate, seed=run.seed)
    rows = []
    if 0 in evals:
        rows.append(base | dict(step=0, reward_queries=0, seconds="", train_seconds=0.0, step_seconds="",
                                reward_mean="", eval_reward=evals[0]))
    train_seconds = 0.0
    for m in run.metrics:
        train_seconds += m.get("step_seconds", 0.0)
        step = int(m["step"])
        rows.append(base | dict(step=step, reward_queries=int(m["reward_queries"]), seconds=m.get("seconds", ""),
                                train_seconds=round(train_seconds, 3), step_seconds=m.get("step_seconds", ""),
                                reward_mean=m["reward_mean"], eval_reward=evals.get(step, "")))
    return rows


def write_csv(rows: list[dict], path: Path, columns: list[str] = CSV_COLUMNS) -> None:
    """runs.csv (CSV_COLUMNS), or lr_sweep.csv with columns=SWEEP_COLUMNS."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def eval_curve(run: Run, axis: str = "queries") -> tuple[np.ndarray, np.ndarray]:
    """(reward queries, eval reward) at each sample grid; a grid's step is mapped to the queries spent after
    that update (step 0: 0 queries). Grids of steps missing from metrics.jsonl are dropped. With
    axis="seconds" the x value is the cumulative step_seconds (train seconds) instead."""
    if axis == "queries":
        queries = {0: 0} | {int(m["step"]): int(m["reward_queries"]) for m in run.metrics}
    else:
        seconds = np.cumsum([m.get("step_seconds", 0.0) for m in run.metrics])
        queries = {0: 0.0} | {int(m["step"]): float(s) for m, s in zip(run.metrics, seconds)}
    points = sorted((queries[int(e["step"])], float(e["eval_reward"])) for e in run.evals if int(e["step"]) in queries)
    if not points:
        return np.zeros(0), np.zeros(0)
    x, y = zip(*points)
    return np.asarray(x, float), np.asarray(y, float)


def train_curve(run: Run, window: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reward queries, train seconds, smoothed reward_mean) per update. The smoothing is a trailing mean over
    the updates whose queries fall in the last `window` queries, each weighted by the images it scored (so a
    batch of 32 weighs 8× a batch of 4); causal, so that a curve never shows a reward before it was reached."""
    if not run.metrics:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    q = np.array([m["reward_queries"] for m in run.metrics], float)
    r = np.array([m["reward_mean"] for m in run.metrics], float)
    s = np.cumsum([m.get("step_seconds", 0.0) for m in run.metrics])
    w = np.diff(np.concatenate([[0.0], q]))  # images scored at each update (0 for updates reusing a batch)
    w = np.where(w > 0, w, 0.0)
    smooth = np.empty_like(r)
    for i in range(len(q)):
        mine = (q > q[i] - window) & (np.arange(len(q)) <= i) & (w > 0)
        # updates that reuse a sampled batch (DDPO-IS, RWR) repeat its reward: weight only the sampling update
        smooth[i] = np.average(r[mine], weights=w[mine]) if mine.any() else r[i]
    return q, s, smooth


def on_grid(x: np.ndarray, y: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """y(x) linearly interpolated on `grid`; NaN outside [x.min(), x.max()] (no extrapolation)."""
    out = np.full(len(grid), np.nan)
    if len(x) == 0:
        return out
    inside = (grid >= x.min()) & (grid <= x.max())
    out[inside] = np.interp(grid[inside], x, y)
    return out


def band(curves: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Mean, std, min and max over seeds at each grid point, ignoring NaN (a seed without data there)."""
    stack = np.vstack(curves) if curves else np.zeros((0, 0))
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)
            return dict(mean=np.nanmean(stack, 0), std=np.nanstd(stack, 0), min=np.nanmin(stack, 0),
                        max=np.nanmax(stack, 0), n=np.sum(~np.isnan(stack), 0))


def first_crossing(x: np.ndarray, y: np.ndarray, threshold: float) -> float | None:
    """The first x at which y reaches `threshold`, linearly interpolated between the point below and the first
    point at or above it; None if it is never reached. A curve that starts at or above the threshold crosses
    at its first x."""
    for i in range(len(x)):
        if y[i] >= threshold:
            if i == 0:
                return float(x[0])
            x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
            return float(x0 + (threshold - y0) / (y1 - y0) * (x1 - x0))
    return None


def gain_curve(run: Run, axis: str = "queries") -> tuple[np.ndarray, np.ndarray]:
    """The eval curve minus its step-0 value (the base model under this script's sampler)."""
    x, y = eval_curve(run, axis)
    if len(x) == 0 or x[0] != 0:
        return np.zeros(0), np.zeros(0)
    return x, y - y[0]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population std (NaN for no values)."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values))


def summarize(runs: list[Run], reward_of: dict[str, str], last_fraction: float = 0.1) -> dict:
    """Per-algorithm figures of one comparison.

    `reward_of`: algorithm -> the reward it trained on; algorithms that share a reward share a threshold.
    Returns {"threshold": {reward: {...}}, "algorithms": {algorithm: {...}}} with, per algorithm, over seeds:
    final eval gain and eval reward, the train reward over the last `last_fraction` of the queries, the
    final evaluation's figures (each run's `final_eval`, the split load_run read), queries to threshold, the
    sample grid's diversity at the start and end, seconds per update and wall time.
    """
    by_algo: dict[str, list[Run]] = {}
    for run in runs:
        if run.metrics:
            by_algo.setdefault(run.algorithm, []).append(run)
    out = {"algorithms": {}, "threshold": {}}
    for algo, algo_runs in by_algo.items():
        algo_runs.sort(key=lambda r: r.seed)
        finals, final_rewards, lates, spu, walls, budgets = [], [], [], [], [], []
        for run in algo_runs:
            x, gain = gain_curve(run)
            finals.append(float(gain[-1]) if len(gain) else math.nan)
            _, y = eval_curve(run)
            final_rewards.append(float(y[-1]) if len(y) else math.nan)
            q = np.array([m["reward_queries"] for m in run.metrics], float)
            r = np.array([m["reward_mean"] for m in run.metrics], float)
            w = np.diff(np.concatenate([[0.0], q]))
            late = (q > q[-1] * (1 - last_fraction)) & (w > 0)
            lates.append(float(np.average(r[late], weights=w[late])) if late.any() else math.nan)
            spu.append(float(np.mean([m["step_seconds"] for m in run.metrics])))
            walls.append(run.info.get("wall_seconds", math.nan))
            budgets.append(run.budget_spent)
        entry = dict(
            reward=reward_of.get(algo, ""),
            seeds=[r.seed for r in algo_runs],
            budget=max(budgets),
            updates=max(len(r.metrics) for r in algo_runs),
            final_gain=finals,
            final_gain_mean_std=mean_std(finals),
            final_eval_reward=final_rewards,
            final_eval_reward_mean_std=mean_std(final_rewards),
            train_reward_last=lates,
            train_reward_last_mean_std=mean_std(lates),
            seconds_per_update=mean_std(spu)[0],
            seconds_per_1k_queries=mean_std([s * len(r.metrics) / max(r.budget_spent, 1) * 1000
                                             for s, r in zip(spu, algo_runs)])[0],
            wall_seconds_total=float(np.nansum(walls)),
            wall_seconds_per_run=mean_std(walls)[0],
            grid_diversity_start_final=[mean_std(v)[0] for v in zip(*map(grid_diversity, algo_runs))],
        )
        # the independent evaluation of the final LoRA (benchmark/evaluate.py), per prompt set and reward
        finals_eval = [r.final_eval for r in algo_runs if r.final_eval]
        if finals_eval:
            entry["final_eval"] = {}
            for prompts, scores in finals_eval[0]["scores"].items():  # "train", "heldout"
                entry["final_eval"][prompts] = {
                    name: mean_std([f["scores"][prompts].get(name) for f in finals_eval if prompts in f["scores"]])
                    for name in scores
                }
        out["algorithms"][algo] = entry

    # thresholds per training reward, then queries to threshold per run
    for reward in sorted({e["reward"] for e in out["algorithms"].values()}):
        members = {a: e for a, e in out["algorithms"].items() if e["reward"] == reward}
        best_algo, best = max(((a, e["final_gain_mean_std"][0]) for a, e in members.items()),
                              key=lambda t: -math.inf if math.isnan(t[1]) else t[1])
        threshold = 0.5 * best if best > 0 else None
        out["threshold"][reward] = dict(gain=threshold, best_algorithm=best_algo, best_final_gain=best,
                                        rule="half the best algorithm's mean final eval gain (base model = 0)")
        for algo, entry in members.items():
            reached = []
            for run in by_algo[algo]:
                x, gain = gain_curve(run)
                reached.append(first_crossing(x, gain, threshold) if threshold is not None else None)
            entry["queries_to_threshold"] = reached
            hits = [v for v in reached if v is not None]
            entry["queries_to_threshold_mean"] = float(np.mean(hits)) if hits else None
            entry["reached_threshold"] = f"{len(hits)}/{len(reached)}"
    return out


def grid_diversity(run: Run) -> tuple[float, float]:
    """`eval/diversity` of the run's sample grid at step 0 and at its last evaluation (NaN without it)."""
    values = [(int(e["step"]), e["eval/diversity"]) for e in run.evals if "eval/diversity" in e]
    if not values:
        return math.nan, math.nan
    values.sort()
    return float(values[0][1]), float(values[-1][1])


# ---------------------------------------------------------------------------------------------------------------
# the learning-rate sweep


def choose_rates(scores: dict[str, dict[float, float]]) -> dict[str, float]:
    """algorithm -> the learning rate with the highest validation score of `scores` (algorithm -> {rate: score}).
    Ties go to the smaller rate (the more conservative step, and the one nearer the papers' rates); a NaN score
    (a run without an evaluation) never wins, and an algorithm without a finite score gets no rate."""
    chosen = {}
    for algo, by_rate in scores.items():
        finite = {lr: v for lr, v in by_rate.items() if v is not None and not math.isnan(v)}
        if finite:
            chosen[algo] = min(finite, key=lambda lr: (-finite[lr], lr))
    return chosen


def next_rate(rate: float, up: bool) -> float:
    """The neighbouring rate of the half-decade series 1, 3, 10, 30, ... × 10^k (1e-4 -> 3e-4 up, 3e-5 down)."""
    i = round(2 * math.log10(rate)) + (1 if up else -1)  # 1e-4 -> -8, 3e-4 -> -7 (log10 3 ≈ 0.48)
    return float(f"{(1 if i % 2 == 0 else 3)}e{i // 2}")


def widen(by_rate: dict[float, float], limits: tuple[float, float]) -> float | None:
    """The rate to add to a sweep grid ({rate: validation score}) whose best rate sits at an edge: the next
    half-decade beyond that edge, if it stays within `limits` (low, high); None when the best rate is inside the
    grid, at a limit, or there is no score yet. A one-rate grid is widened upwards first."""
    best = choose_rates({"": by_rate}).get("")
    if best is None:
        return None
    rates = sorted(by_rate)
    low, high = limits
    if best == rates[-1] and next_rate(best, up=True) <= high * (1 + 1e-9):
        return next_rate(best, up=True)
    if best == rates[0] and next_rate(best, up=False) >= low * (1 - 1e-9):
        return next_rate(best, up=False)
    return None


def sweep_rows(scores: dict[str, dict[float, float]], seed: int, labels: dict[str, str]) -> list[dict]:
    """The rows of lr_sweep.csv (SWEEP_COLUMNS): one per algorithm and rate, `chosen` 1 on choose_rates' rate."""
    chosen = choose_rates(scores)
    return [dict(algorithm=labels.get(algo, algo), learning_rate=f"{lr:g}", seed=seed, validation_score=score,
                 chosen=int(chosen.get(algo) == lr))
            for algo, by_rate in scores.items() for lr, score in sorted(by_rate.items())]



# ---------------------------------------------------------------------------------------------------------------
# claims: a difference between two algorithms' per-seed finals and whether the seeds resolve it

RESOLVE_SE = 2.0  # a difference counts as resolved when |mean difference| > RESOLVE_SE standard errors
RL_CLAIMS = (  # (claim, the algorithm said to be ahead, the other): the papers' claims among the RL scripts
    ("DDPO-IS ahead of DDPO-SF (DDPO)", "ddpo_is", "ddpo_sf"),
    ("DDPO-IS ahead of RWR (DDPO)", "ddpo_is", "rwr"),
    ("DDPO-SF ahead of RWR (DDPO)", "ddpo_sf", "rwr"),
    ("GRPO ahead of DDPO-IS (DanceGRPO, Flow-GRPO)", "grpo", "ddpo_is"),
)


@dataclass
class Sample:
    """Per-seed finals summarised: mean, sample std (ddof 1; NaN for fewer than 2 seeds) and the number of seeds."""

    mean: float
    sd: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Sample":
        v = [x for x in values if x is not None and not math.isnan(x)]
        if not v:
            return cls(math.nan, math.nan, 0)
        return cls(float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else math.nan, len(v))

    @classmethod
    def from_population_std(cls, mean: float, std: float, n: int) -> "Sample":
        """From mean_std's (mean, population std) over n seeds, as summary.json stores them."""
        return cls(mean, std * math.sqrt(n / (n - 1)) if n > 1 else math.nan, n)


def difference(a: Sample, b: Sample) -> dict:
    """a − b with the standard error of an unpaired difference of means, sqrt(sd_a²/n_a + sd_b²/n_b) (the seeds of
    two algorithms share nothing that pairs them: each draws its own images), and `resolved`: |diff| > RESOLVE_SE
    standard errors; None when either side has fewer than 2 seeds (no spread to compare with)."""
    diff = a.mean - b.mean
    if a.n < 2 or b.n < 2:
        return dict(diff=diff, se=math.nan, resolved=None)
    se = math.sqrt(a.sd ** 2 / a.n + b.sd ** 2 / b.n)
    return dict(diff=diff, se=se, resolved=bool(abs(diff) > RESOLVE_SE * se))


def verdict(d: dict, ahead: str, behind: str) -> str:
    """The claim "`ahead` ahead of `behind`" judged by difference() of ahead − behind."""
    if d["resolved"] is None:
        return "too few seeds"
    if not d["resolved"]:
        return "not resolved"
    return "agrees" if d["diff"] > 0 else f"contradicts ({behind} ahead)"


def rl_claims(finals: dict[str, list[float]], labels: dict[str, str] = LABELS) -> list[dict]:
    """The RL_CLAIMS rows whose two algorithms have finals (algorithm -> per-seed final Δ vs base)."""
    rows = []
    for claim, x, y in RL_CLAIMS:
        if finals.get(x) and finals.get(y):
            a, b = Sample.of(finals[x]), Sample.of(finals[y])
            d = difference(a, b)
            rows.append(dict(claim=claim, a=x, b=y, sample_a=a, sample_b=b, **d,
                             verdict=verdict(d, labels.get(x, x), labels.get(y, y))))
    return rows


def gradient_claims(finals: dict[str, list[float]], gradient: dict[str, Sample], rl_budget: int,
                    gradient_budget: int, labels: dict[str, str] = LABELS) -> list[dict]:
    """"Gradient scripts more sample-efficient than the RL scripts": each gradient script's final Δ at its budget
    (`gradient`, from the main comparison) against the best RL script's here (the highest mean, a choice that
    favours RL), at `rl_budget` queries. The claim per query agrees when the
    gradient script is ahead beyond the seeds with no more queries than the RL script had."""
    means = {x: Sample.of(v) for x, v in finals.items() if v}
    means = {x: s for x, s in means.items() if s.n}
    if not means:
        return []
    best = max(means, key=lambda x: means[x].mean)
    rows = []
    for g, s in gradient.items():
        d = difference(s, means[best])
        v = verdict(d, labels.get(g, g), labels.get(best, best))
        if v == "agrees" and gradient_budget > rl_budget:  # ahead, but with more queries: nothing per query
            v = f"not shown ({labels.get(g, g)} ahead with {gradient_budget / rl_budget:.3g}× the queries)"
        elif v.startswith("contradicts") and gradient_budget < rl_budget:  # RL ahead, but with more queries
            v = f"not shown ({labels.get(best, best)} ahead with {rl_budget / gradient_budget:.3g}× the queries)"
        rows.append(dict(claim=f"{labels.get(g, g)} at {gradient_budget} queries ahead of the best RL script, "
                               f"{labels.get(best, best)}, at {rl_budget} "
                               f"({rl_budget / gradient_budget:.3g}× as many)",
                         a=g, b=best, sample_a=s, sample_b=means[best], **d, verdict=v))
    return rows
