"""benchmark/compare.py's data logic on synthetic run directories (no script is run): CSV rows, curves, spread
over seeds, threshold and queries-to-threshold, the configuration's equal budget, the learning-rate sweep's choice,
the validation/test split, and the report files."""

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmark import analysis, compare, report


def write_run(run_dir: Path, queries_per_update: int, rewards: list[float], evals: dict[int, float],
              step_seconds: float = 1.0, wall: float = 10.0, final_eval: dict | None = None,
              split: str = "test", finished: bool = True) -> Path:
    """A run directory as a script and compare.py leave it: metrics.jsonl, eval.jsonl, bench_run.json (stamped
    "finished" unless the run was stopped), and the final evaluation `final_eval` of `split` ({split}_eval.json)."""
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for i, r in enumerate(rewards, 1):
            f.write(json.dumps(dict(step=i, reward_mean=r, reward_queries=i * queries_per_update,
                                    step_seconds=step_seconds, seconds=2.0 + i * step_seconds)) + "\n")
    with open(run_dir / "eval.jsonl", "w") as f:
        for step, value in evals.items():
            f.write(json.dumps(dict(step=step, eval_reward=value, scores=[value])) + "\n")
    info = dict(cmd=["x.py"], wall_seconds=wall, finished="2026-12-07T00:00:00Z") if finished else dict(cmd=["x.py"])
    (run_dir / "bench_run.json").write_text(json.dumps(info))
    if final_eval is not None:
        write_eval(run_dir, split, final_eval)
    return run_dir


def write_eval(run_dir: Path, split: str, scores: dict) -> None:
    """benchmark/evaluate.py's file: {split}_eval.json with `scores` ({prompt set: {reward: value}})."""
    result = dict(config=dict(split=split, num_images=8), scores=scores["scores"], seconds=1.0)
    (run_dir / f"{split}_eval.json").write_text(json.dumps(result))


def test_csv_rows_map_eval_grids_to_updates(tmp_path):
    d = write_run(tmp_path / "r", 4, [-3.0, -2.0, -1.0], {0: -3.5, 2: -1.5, 3: -1.0}, step_seconds=0.5)
    run = analysis.load_run(d, "alignment", "draft", 0)
    rows = analysis.csv_rows(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["reward_queries"] == 0 and rows[0]["eval_reward"] == -3.5 and rows[0]["reward_mean"] == ""
    assert rows[1]["eval_reward"] == "" and rows[2]["eval_reward"] == -1.5
    assert [r["train_seconds"] for r in rows] == [0.0, 0.5, 1.0, 1.5]
    analysis.write_csv(rows, tmp_path / "runs.csv")
    with open(tmp_path / "runs.csv") as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == analysis.CSV_COLUMNS and len(back) == 4 and back[3]["reward_queries"] == "12"


def test_truncated_metrics_line_is_skipped(tmp_path):
    d = write_run(tmp_path / "r", 4, [1.0, 2.0], {0: 0.0})
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "rew')
    assert len(analysis.load_run(d, "c", "draft", 0).metrics) == 2


def test_eval_curve_uses_queries_and_seconds(tmp_path):
    d = write_run(tmp_path / "r", 12, [0.0] * 4, {0: 1.0, 2: 2.0, 4: 4.0}, step_seconds=3.0)
    run = analysis.load_run(d, "c", "draft_lv", 0)
    x, y = analysis.eval_curve(run)
    assert x.tolist() == [0, 24, 48] and y.tolist() == [1.0, 2.0, 4.0]
    xs, _ = analysis.eval_curve(run, "seconds")
    assert xs.tolist() == [0.0, 6.0, 12.0]
    xg, g = analysis.gain_curve(run)
    assert g.tolist() == [0.0, 1.0, 3.0]


def test_train_curve_weights_sampled_batches_only(tmp_path):
    # DDPO-IS style: a batch of 8 every 4 updates; the 3 reuse updates repeat the batch's reward and must not
    # count 4 times; the trailing window covers the last 16 queries
    rewards = [1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0]
    d = tmp_path / "r"
    d.mkdir()
    with open(d / "metrics.jsonl", "w") as f:
        for i, r in enumerate(rewards, 1):
            f.write(json.dumps(dict(step=i, reward_mean=r, reward_queries=8 * ((i + 3) // 4), step_seconds=1)) + "\n")
    run = analysis.load_run(d, "c", "ddpo_is", 0)
    q, s, smooth = analysis.train_curve(run, window=16)
    assert q.tolist() == [8] * 4 + [16] * 4
    assert smooth[3] == 1.0 and smooth[-1] == 2.0  # (1·8 + 3·8) / 16
    _, _, narrow = analysis.train_curve(run, window=8)
    assert narrow[-1] == 3.0


def test_on_grid_and_band():
    grid = np.array([0.0, 5.0, 10.0, 20.0])
    a = analysis.on_grid(np.array([0.0, 10.0]), np.array([0.0, 1.0]), grid)
    assert a[:3].tolist() == [0.0, 0.5, 1.0] and math.isnan(a[3])  # no extrapolation
    b = analysis.on_grid(np.array([0.0, 20.0]), np.array([2.0, 2.0]), grid)
    band = analysis.band([a, b])
    assert band["mean"][1] == 1.25 and band["min"][1] == 0.5 and band["max"][1] == 2.0
    assert band["mean"][3] == 2.0 and band["n"].tolist() == [2, 2, 2, 1]
    assert band["std"][0] == 1.0


def test_first_crossing_interpolates():
    x = np.array([0.0, 100.0, 200.0, 300.0])
    y = np.array([0.0, 0.2, 0.6, 1.0])
    assert analysis.first_crossing(x, y, 0.4) == pytest.approx(150.0)
    assert analysis.first_crossing(x, y, 0.2) == 100.0
    assert analysis.first_crossing(x, y, 0.0) == 0.0
    assert analysis.first_crossing(x, y, 1.5) is None
    assert analysis.first_crossing(x, np.array([0.0, 0.5, 0.1, 0.9]), 0.4) == pytest.approx(80.0)  # the first one


def test_summarize_threshold_and_queries(tmp_path):
    fe = lambda em: dict(scores=dict(train=dict(shapes_exact_match=em), heldout=dict(shapes_exact_match=em / 2)))
    runs = []
    # "fast" gains 2.0 by 48 queries, "slow" gains 1.0 by 48; the threshold is half the best: 1.0
    for seed, bump in ((0, 0.0), (1, 0.2)):
        runs.append(analysis.load_run(write_run(tmp_path / f"fast{seed}", 4, [0.0] * 12,
                                                {0: 5.0, 6: 6.5 + bump, 12: 7.0}, wall=20, final_eval=fe(0.5)),
                                      "alignment", "draft_lv", seed))
        runs.append(analysis.load_run(write_run(tmp_path / f"slow{seed}", 16, [0.0, 1.0, 2.0],
                                                {0: 1.0, 3: 2.0}, step_seconds=4.0, wall=30, final_eval=fe(0.25)),
                                      "alignment", "ddpo_sf", seed))
    s = analysis.summarize(runs, {"draft_lv": "r", "ddpo_sf": "r"})
    t = s["threshold"]["r"]
    assert t["best_algorithm"] == "draft_lv" and t["best_final_gain"] == 2.0 and t["gain"] == 1.0
    fast, slow = s["algorithms"]["draft_lv"], s["algorithms"]["ddpo_sf"]
    # seed 0: gain 1.5 at 24 queries -> crossing at 16; seed 1: 1.7 at 24 -> 24·1/1.7
    assert fast["queries_to_threshold"] == pytest.approx([16.0, 24 / 1.7])
    assert fast["reached_threshold"] == "2/2"
    assert slow["queries_to_threshold"] == [48.0, 48.0]
    assert fast["final_gain_mean_std"] == (2.0, 0.0) and slow["final_gain_mean_std"] == (1.0, 0.0)
    assert fast["final_eval"]["train"]["shapes_exact_match"] == (0.5, 0.0)
    assert fast["final_eval"]["heldout"]["shapes_exact_match"] == (0.25, 0.0)
    assert slow["train_reward_last_mean_std"][0] == 2.0  # last 10% of 48 queries: the last update
    assert slow["seconds_per_update"] == 4.0 and slow["seconds_per_1k_queries"] == pytest.approx(250.0)
    assert fast["wall_seconds_total"] == 40 and slow["budget"] == 48


def test_threshold_not_reached_and_undefined(tmp_path):
    up = analysis.load_run(write_run(tmp_path / "a", 4, [0.0] * 4, {0: 0.0, 4: 1.0}), "c", "draft", 0)
    flat = analysis.load_run(write_run(tmp_path / "b", 4, [0.0] * 4, {0: 0.0, 4: 0.1}), "c", "refl", 0)
    s = analysis.summarize([up, flat], {"draft": "r", "refl": "r"})
    assert s["algorithms"]["refl"]["queries_to_threshold"] == [None]
    assert s["algorithms"]["refl"]["reached_threshold"] == "0/1"
    down = analysis.load_run(write_run(tmp_path / "c", 4, [0.0] * 4, {0: 0.0, 4: -1.0}), "c", "draft", 0)
    s = analysis.summarize([down], {"draft": "r"})
    assert s["threshold"]["r"]["gain"] is None and s["algorithms"]["draft"]["queries_to_threshold"] == [None]


def comparison(**kw) -> compare.Comparison:
    """The main comparison's shape with small numbers; keyword arguments override fields."""
    fields = dict(name="alignment", title="t", model="tiny-shapes", prompts="shapes", heldout_prompts="shapes_heldout",
                  rl_reward="shapes_alignment", grad_reward="shapes_alignment",
                  eval_rewards=["shapes_exact_match", "shapes_alignment"], budget=768, seeds=[0],
                  num_inference_steps=20, guidance_scale=7.5, lr={a: [1e-3] for a in compare.ALGORITHMS})
    return compare.Comparison(**(fields | kw))


def test_every_algorithm_gets_the_same_budget():
    c = comparison()
    for algo in compare.ALGORITHMS:
        flags, steps, per_update, settings = compare.script_settings(c, algo, 3e-3)
        assert steps * per_update == 768, algo
        assert flags[flags.index("--steps") + 1] == str(steps)
        assert flags[flags.index("--learning-rate") + 1] == "0.003"
    assert compare.script_settings(c, "draft_lv", 1e-3)[1] == 64  # 4 images × (n + 1) = 12 queries per update
    # the clip range scales with the rate: DDPO's 1e-4 at its 3e-4
    assert compare.script_settings(c, "ddpo_is", 3e-4)[3]["clip_range"] == pytest.approx(1e-4)
    assert compare.script_settings(c, "grpo", 3e-3)[3]["clip_range"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="not a multiple"):
        compare.script_settings(comparison(budget=100), "ddpo_sf", 1e-3)


def test_plan_orders_seeds_first_and_skips_finished(tmp_path):
    a = compare.parse_args(["--smoke", "--out", str(tmp_path)])
    sweep, comps = compare.comparisons(a)
    for c in comps:
        c.lr = {algo: [1e-3] for algo in compare.ALGORITHMS}
    files = {c.prompts: tmp_path / "p.txt" for c in comps}
    jobs = compare.plan(comps, tmp_path, files)
    assert len(jobs) == 8 * 2 + 8 * 1
    assert [j.seed for j in jobs[:14]] == [0] * 14 and {j.comparison.name for j in jobs[:14]} == {"alignment", "jpeg"}
    sweep_jobs = compare.plan([sweep], tmp_path, files)
    assert len(sweep_jobs) == 8 * 2 and {j.lr for j in sweep_jobs} == {3e-3, 1e-2}  # smoke: two rates, one seed
    assert len({j.run_dir for j in sweep_jobs}) == 16
    job = jobs[0]
    assert not compare.run_finished(job)
    job.run_dir.mkdir(parents=True)
    (job.run_dir / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (job.run_dir / "bench_run.json").write_text(json.dumps(dict(cmd=job.cmd)))
    assert not compare.run_finished(job)  # started (the marker execute() writes first), never finished
    (job.run_dir / "bench_run.json").write_text(json.dumps(dict(cmd=job.cmd, finished="2026-12-07T00:00:00Z")))
    assert compare.run_finished(job)
    save = job.cmd.index("--save-every") + 1
    other_saves = job.cmd[:save] + ["7"] + job.cmd[save + 1 :]
    (job.run_dir / "bench_run.json").write_text(json.dumps(dict(cmd=other_saves, finished="2026-12-07T00:00:00Z")))
    assert compare.run_finished(job)  # checkpoints are bookkeeping: the same run
    (job.run_dir / "bench_run.json").write_text(json.dumps(dict(cmd=job.cmd + ["--x"], finished="2026-12-07")))
    assert not compare.run_finished(job)  # another configuration: rerun


def test_report_writes_outputs_for_partial_results(tmp_path):
    pytest.importorskip("matplotlib")
    a = compare.parse_args(["--smoke", "--out", str(tmp_path), "--comparisons", "alignment",
                            "--algorithms", "draft", "ddpo_sf"])
    _, comps = compare.comparisons(a)
    comps[0].lr = dict(draft=[1e-3], ddpo_sf=[1e-3])
    jobs = compare.plan(comps, tmp_path, {"simple_animals": tmp_path / "p.txt"})
    for j in jobs[:3]:  # 3 of 4 runs finished
        write_run(j.run_dir, int(j.queries_per_update), list(np.linspace(0, 1, j.steps)), {0: 0.0, j.steps: 1.0},
                  final_eval=dict(scores=dict(train={"jpeg_compressibility_diff": -1.0},
                                              heldout={"jpeg_compressibility_diff": -2.0}), seconds=1.0))
    # the 4th was started and stopped: its metrics and its bench_run.json (the command only) are there, not its end
    write_run(jobs[3].run_dir, int(jobs[3].queries_per_update), [0.0, 0.5], {0: 0.0}, finished=False)
    from benchmark import report

    result = report.write(comps, jobs, tmp_path, elapsed=1.0, final=False)
    assert (tmp_path / "alignment_reward_vs_queries.png").is_file()
    assert (tmp_path / "alignment_reward_vs_seconds.png").is_file()
    md = (tmp_path / "summary.md").read_text()
    assert "3 of 4 runs finished" in md and "DRaFT-1" in md and "partial" in md
    assert json.loads((tmp_path / "summary.json").read_text())["comparisons"]["alignment"]["runs_finished"] == 3
    with open(tmp_path / "runs.csv") as f:
        assert len(list(csv.DictReader(f))) == sum(j.steps + 1 for j in jobs[:3])
    assert result["final"] is False


def test_eval_prompts_cover_the_set_evenly():
    from benchmark.evaluate import eval_prompts

    prompts = [f"p{i}" for i in range(24)]
    assert eval_prompts(prompts, 48) == prompts * 2  # every prompt equally often
    assert eval_prompts(prompts, 12) == prompts[::2]
    assert eval_prompts(prompts, 24) == prompts


def test_evaluation_redone_when_a_reward_the_image_count_or_the_split_changes(tmp_path):
    c = comparison(budget=96, eval_images=48)
    path = tmp_path / "test_eval.json"
    assert not compare.eval_done(path, c)
    both = dict(shapes_exact_match=0.1, shapes_alignment=-3.0)
    path.write_text(json.dumps(dict(config=dict(num_images=48, split="test"),
                                    scores=dict(train=dict(shapes_exact_match=0.1), heldout=both))))
    assert not compare.eval_done(path, c)  # shapes_alignment missing
    path.write_text(json.dumps(dict(config=dict(num_images=48, split="test"), scores=dict(train=both))))
    assert not compare.eval_done(path, c)  # the held-out prompts missing
    path.write_text(json.dumps(dict(config=dict(num_images=48, split="test"), scores=dict(train=both, heldout=both))))
    assert compare.eval_done(path, c)
    assert not compare.eval_done(path, comparison(budget=96, eval_images=48, split="validation"))
    c.eval_images = 96
    assert not compare.eval_done(path, c)


# ---------------------------------------------------------------------------------------------------------------
# the learning-rate sweep and the validation/test split


def test_chosen_rate_is_the_best_validation_score_ties_to_the_smaller_rate():
    scores = dict(draft={1e-4: -6.0, 3e-4: -5.5, 1e-3: -5.9, 3e-3: -7.0},
                  rwr={1e-4: -4.0, 3e-4: -4.0, 1e-3: -9.0},  # a tie: the smaller rate
                  refl={1e-4: math.nan, 3e-4: -8.0, 1e-3: -7.5},  # a missing evaluation never wins
                  grpo={1e-4: math.nan})
    chosen = analysis.choose_rates(scores)
    for algo, by_rate in scores.items():  # written differently: the best finite score, then the smallest such rate
        finite = [(v, lr) for lr, v in by_rate.items() if v == v]
        if not finite:
            assert algo not in chosen
            continue
        best = max(v for v, _ in finite)
        assert chosen[algo] == sorted(lr for v, lr in finite if v == best)[0]
    assert chosen == dict(draft=3e-4, rwr=1e-4, refl=1e-3)


def test_sweep_grid_widens_at_an_edge_within_limits():
    limits = (1e-5, 3e-2)
    grid = {1e-4: -6.0, 3e-4: -5.0, 1e-3: -4.0, 3e-3: -3.0}
    assert analysis.widen(grid, limits) == pytest.approx(1e-2)  # best at the top edge: one half-decade up
    assert analysis.widen({**grid, 1e-4: 0.0}, limits) == pytest.approx(3e-5)  # at the bottom: one down
    assert analysis.widen({**grid, 1e-3: 1.0}, limits) is None  # inside
    assert analysis.widen({1e-2: -1.0, 3e-2: 0.0}, limits) is None  # at the upper limit
    assert analysis.widen({1e-5: 0.0, 3e-5: -1.0}, limits) is None  # at the lower limit
    assert analysis.widen({}, limits) is None
    assert [analysis.next_rate(r, up=True) for r in (1e-4, 3e-4, 1e-3, 3e-3)] == pytest.approx([3e-4, 1e-3, 3e-3, 1e-2])


def test_sweep_report_marks_the_best_rate_and_the_final_table_reads_only_the_test_split(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmark import report

    a = compare.parse_args(["--smoke", "--out", str(tmp_path), "--comparisons", "alignment",
                            "--algorithms", "draft", "ddpo_sf"])
    sweep, comps = compare.comparisons(a)
    reward = sweep.grad_reward
    validation = {("draft", 3e-3): -900.0, ("draft", 1e-2): -800.0, ("ddpo_sf", 3e-3): -1000.0,
                  ("ddpo_sf", 1e-2): -1000.0}
    jobs = compare.plan([sweep], tmp_path, {"simple_animals": tmp_path / "p.txt"})
    for j in jobs:
        write_run(j.run_dir, int(j.queries_per_update), [0.0] * j.steps, {0: 0.0, j.steps: 1.0}, split="validation",
                  final_eval=dict(scores=dict(train={reward: validation[(j.algorithm, j.lr)]})))
    chosen = compare.sweep_scores(jobs)
    assert analysis.choose_rates(chosen) == dict(draft=1e-2, ddpo_sf=3e-3)
    comps[0].lr = dict(draft=[1e-2], ddpo_sf=[3e-3])
    final_jobs = compare.plan(comps, tmp_path, {"simple_animals": tmp_path / "p.txt"})
    for j in final_jobs:  # each final run holds a validation evaluation too, with other numbers
        test = {reward: -100.0 * (j.seed + 1), "jpeg_compressibility": -1.0}
        write_run(j.run_dir, int(j.queries_per_update), [0.0] * j.steps, {0: 0.0, j.steps: 1.0},
                  final_eval=dict(scores=dict(train=test, heldout=test)))
        write_eval(j.run_dir, "validation", dict(scores=dict(train={reward: 5.0}, heldout={reward: 5.0})))
    for c, eta in itertools.product((sweep, comps[0]), (0.0, 1.0)):
        base = compare.base_file(tmp_path, c, eta)
        base.parent.mkdir(parents=True, exist_ok=True)
        base.write_text(json.dumps(dict(config=dict(eta=eta, split=c.split), seconds=1.0, scores=dict(
            train={reward: -1000.0, "jpeg_compressibility": -1.0}, heldout={reward: -1000.0}))))
    result = report.write([sweep, *comps], jobs + final_jobs, tmp_path, elapsed=1.0, final=True)

    with open(tmp_path / "lr_sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["algorithm", "learning_rate", "seed", "validation_score", "chosen"]
    assert {(r["algorithm"], float(r["learning_rate"]), r["chosen"]) for r in rows} == {
        ("DRaFT-1", 3e-3, "0"), ("DRaFT-1", 1e-2, "1"), ("DDPO-SF", 3e-3, "1"), ("DDPO-SF", 1e-2, "0")}
    assert {r["seed"] for r in rows} == {str(a.sweep_seed)} and a.sweep_seed not in comps[0].seeds
    assert (tmp_path / "lr_sweep.png").is_file()
    # the final table: seeds 0 and 1 scored -100 and -200 on the test split; the validation files' 5.0 is not used
    final = result["comparisons"]["alignment"]["summary"]["algorithms"]["draft"]["final_eval"]
    assert final["train"][reward] == (-150.0, 50.0)
    assert "**+200.00**" in (tmp_path / "summary.md").read_text()  # the chosen draft rate, -800 vs base -1000


def test_a_test_eval_file_holding_another_split_is_refused(tmp_path):
    d = write_run(tmp_path / "r", 4, [0.0], {0: 0.0})
    write_eval(d, "validation", dict(scores=dict(train=dict(r=1.0))))
    (d / "test_eval.json").write_text((d / "validation_eval.json").read_text())
    with pytest.raises(ValueError, match="validation split"):
        analysis.load_run(d, "c", "draft", 0)
    assert analysis.load_run(d, "c", "draft", 0, split="validation").final_eval["scores"]["train"]["r"] == 1.0


def test_validation_and_test_splits_share_no_caption_and_no_noise():
    from benchmark.evaluate import SPLITS, CHUNK, split_prompts
    from shapes import data

    for prompts in (data.TRAIN_PROMPTS, data.HELDOUT_PROMPTS):
        test, validation = split_prompts(prompts, "test"), split_prompts(prompts, "validation")
        assert not set(test) & set(validation) and sorted(test + validation) == sorted(prompts)
        for half in (test, validation):  # every (shape, colour, background) once per half, half of them as two
            attrs = [data.parse_caption(p) for p in half]
            combos = {(x.shape, x.color, x.background) for x in attrs}
            assert len(combos) == len(half) == len(prompts) // 2
            assert sum(x.count == 2 for x in attrs) == len(half) // 2
    # the seeds of the two splits' chunks: test 10000 + i, validation 20000 + i, far apart for any run's chunk count
    assert abs(SPLITS["validation"] - SPLITS["test"]) * CHUNK > 10 * 96 * CHUNK
    with pytest.raises(ValueError, match="split"):
        split_prompts(data.TRAIN_PROMPTS, "train")


def test_sweep_scores_validation_final_runs_the_test_split(tmp_path):
    a = compare.parse_args(["--out", str(tmp_path)])
    sweep, comps = compare.comparisons(a)
    assert sweep.split == "validation" and sweep.seeds == [compare.SWEEP_SEED]
    assert all(c.split == "test" for c in comps) and all(compare.SWEEP_SEED not in c.seeds for c in comps)
    assert sweep.lr == {algo: [1e-4, 3e-4, 1e-3, 3e-3] for algo in compare.ALGORITHMS}
    assert set(sweep.eval_sets()) == {"train"} and set(comps[0].eval_sets()) == {"train", "heldout"}
    job = compare.plan([sweep], tmp_path, {"shapes": tmp_path / "p.txt"})[0]
    assert job.eval_file.name == "validation_eval.json"
    # the sample grid's prompts (the first lines of the training file) are test-split captions
    from benchmark.evaluate import split_prompts
    import common

    lines = compare.training_prompt_file("shapes", tmp_path).read_text().split("\n")
    assert set(lines[:48]) == set(split_prompts(common.load_prompts("shapes"), "test"))
    with pytest.raises(SystemExit, match="also a seed"):
        compare.comparisons(compare.parse_args(["--sweep-seed", "1"]))


def test_paired_eval_scores_the_images_of_shapes_evaluate():
    import torch

    import common
    from benchmark import paired_eval
    from shapes import data
    from shapes import evaluate as shapes_evaluate

    torch.manual_seed(0)
    pipe = common.load_pipeline("tiny-shapes", 0, "cpu", torch.float32)
    prompts = data.TRAIN_PROMPTS[:2]
    ours = paired_eval.images_scores(pipe, prompts, 2, 2, 7.5)
    official = shapes_evaluate.evaluate(pipe, prompts, 2, 2, 7.5)  # the README's evaluation
    assert ours["shapes_alignment"].shape == (2, 2)
    assert float(ours["shapes_alignment"].mean()) == pytest.approx(official["shapes_alignment"], abs=1e-5)
    assert float(ours["shapes_exact_match"].mean()) == pytest.approx(official["exact_match"], abs=1e-9)


def test_paired_change_and_its_noise():
    from benchmark import paired_eval
    import torch

    rng = np.random.default_rng(0)
    before = rng.normal(size=(4, 6))
    after = before + rng.normal(0.5, 0.2, size=(4, 6))
    r = paired_eval.paired(torch.tensor(before), torch.tensor(after))
    d = (after - before).ravel()
    assert r["change"] == pytest.approx(d.mean()) and r["before"] == pytest.approx(before.mean())
    assert r["diff_std"] == pytest.approx(np.std(d, ddof=1))
    assert r["standard_error"] == pytest.approx(np.std(d, ddof=1) / np.sqrt(24)) and r["images"] == 24
    assert r["change_by_seed_half"] == pytest.approx([(after - before)[:2].mean(), (after - before)[2:].mean()])


def test_paired_eval_scores_a_prompt_file_and_fewer_heldout_seeds(tmp_path, monkeypatch):
    """--prompt-file replaces the 96 training captions by the file's, --heldout-samples-per-prompt sets the held-out
    seeds; the held-out captions are still scored (the drawing itself is the test above)."""
    import json

    import torch

    import common
    from benchmark import paired_eval
    from shapes import data

    class Pipe:
        def load_lora_weights(self, path):
            self.lora = path

    calls = []

    def scores(pipe, prompts, seeds, num_steps, guidance_scale, names, eta):
        assert names == paired_eval.REWARDS and eta == 0.0  # the defaults: shapes.evaluate's figures and sampler
        calls.append((list(prompts), seeds, num_steps, guidance_scale))
        return {name: torch.zeros(seeds, len(prompts)) for name in names}

    monkeypatch.setattr(common, "load_pipeline", lambda *a, **k: Pipe())
    monkeypatch.setattr(paired_eval, "images_scores", scores)
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text(json.dumps(dict(model="tiny-shapes", num_inference_steps=3, guidance_scale=7.5)))
    (tmp_path / "p.txt").write_text("a red circle on a blue background\ntwo red circles on a blue background\n")
    paired_eval.main([str(run), "--prompt-file", str(tmp_path / "p.txt"), "--samples-per-prompt", "5",
                      "--heldout-samples-per-prompt", "2"])
    file_prompts = ["a red circle on a blue background", "two red circles on a blue background"]
    assert calls == [(file_prompts, 5, 3, 7.5)] * 2 + [(list(data.HELDOUT_PROMPTS), 2, 3, 7.5)] * 2
    result = json.loads((run / "paired_eval.json").read_text())
    assert result["prompts"] == file_prompts and result["train"]["shapes_alignment"]["images"] == 10
    assert result["heldout"]["shapes_alignment"]["images"] == 2 * len(data.HELDOUT_PROMPTS)


def test_paired_eval_of_an_rl_run_pairs_its_stochastic_sampler(tmp_path, capsys):
    """--eta 1 --rewards ...: an RL run scored on its own sampler (rl.md section 6). The same seeds fix the per-step
    noise too, so a LoRA of zeros (the model unchanged) gives a change of exactly 0 on every image, although η = 1
    draws other images than η = 0; a bad reward spec or η is one line, not a traceback."""
    import json

    import torch

    import common
    from benchmark import paired_eval

    torch.manual_seed(0)
    pipe = common.load_pipeline("tiny-shapes", 2, "cpu", torch.float32)  # a rank-2 LoRA, B = 0: the model unchanged
    run = tmp_path / "run"
    common.save_lora(pipe, run)
    (run / "args.json").write_text(json.dumps(dict(model="tiny-shapes", num_inference_steps=2, guidance_scale=7.5)))
    (tmp_path / "p.txt").write_text("a red circle on a blue background\n")
    paired_eval.main([str(run), "--prompt-file", str(tmp_path / "p.txt"), "--samples-per-prompt", "2",
                      "--heldout-samples-per-prompt", "1", "--rewards", "jpeg_incompressibility", "--eta", "1"])
    result = json.loads((run / "paired_eval.json").read_text())
    assert result["eta"] == 1.0 and set(result["train"]) == {"jpeg_incompressibility"}
    for split in ("train", "heldout"):
        r = result[split]["jpeg_incompressibility"]
        assert r["change"] == 0.0 and r["diff_std"] == 0.0 and r["before"] > 0
    images = dict(eta1=paired_eval.images_scores(pipe, ["a red circle on a blue background"], 1, 2, 7.5,
                                                 ("jpeg_incompressibility",), 1.0),
                  eta0=paired_eval.images_scores(pipe, ["a red circle on a blue background"], 1, 2, 7.5,
                                                 ("jpeg_incompressibility",), 0.0))
    assert not torch.equal(images["eta1"]["jpeg_incompressibility"], images["eta0"]["jpeg_incompressibility"])
    for bad, message in ((["--rewards", "jpeg_size"], "--rewards jpeg_size: unknown reward"),
                         (["--eta", "-1"], "--eta -1: must be >= 0")):
        with pytest.raises(SystemExit) as e:
            paired_eval.main([str(run), *bad])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_plot_eval_draws_every_logged_key_and_refuses_a_non_run(tmp_path, capsys):
    from PIL import Image

    from benchmark import plot_eval

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "eval_reward": -9 + s / 50, "eval/diversity": 0.4 - s / 1000, "eval/shapes_exact_match": 0.1}
            for s in (0, 50, 100)]
    (run / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_eval.main([str(run), "--output", str(tmp_path / "out" / "curves.png")])
    width, height = Image.open(tmp_path / "out" / "curves.png").size
    assert width > 2.5 * height  # three panels side by side: the reward, diversity and the held-out reward
    with pytest.raises(SystemExit) as e:
        plot_eval.main([str(tmp_path / "nothing"), "--output", str(tmp_path / "x.png")])
    assert "eval.jsonl: no such file" in str(e.value) and not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------------------------
# the RL stages (issue 27): planning, the claims' statistics, the report, and the smoke run end to end


def test_flow_testbed_plans_flow_grpo_noise_for_the_rl_scripts_only(tmp_path):
    """On tiny-shapes-flow the RL scripts sample Flow-GRPO's noise level 0.7 (--eta 0.7) and the base model is
    evaluated under it; the gradient scripts get no --eta; on tiny-shapes no command carries --eta (the scripts'
    default η = 1, the commands of the committed benchmark unchanged)."""
    rates = [f"{x}=1e-3" for x in compare.ALGORITHMS]
    for model, eta in (("tiny-shapes-flow", "0.7"), ("tiny-shapes", None)):
        a = compare.parse_args(["--model", model, "--comparisons", "alignment", "--lr", *rates, "--out", str(tmp_path)])
        _, comps = compare.comparisons(a)
        for c in comps:
            c.lr = {x: [r] for x, r in dict(a.lr).items()}
        jobs = compare.plan(comps, tmp_path, {"shapes": tmp_path / "p.txt"})
        assert len(jobs) == 24 and all(j.cmd[j.cmd.index("--model") + 1] == model for j in jobs)
        for j in jobs:
            given = j.cmd[j.cmd.index("--eta") + 1] if "--eta" in j.cmd else None
            assert given == (eta if j.algorithm in compare.RL else None), (model, j.algorithm, j.cmd)
        assert comps[0].num_inference_steps == 20
        assert comps[0].guidance_scale == (7.0 if model == "tiny-shapes-flow" else 7.5)
        assert report._eta(comps[0], "grpo") == float(eta or 1) and report._eta(comps[0], "draft") == 0.0


def test_rl_stage_plans_the_rl_scripts_at_2048_queries_with_8_grids_and_fixed_rates(tmp_path):
    a = compare.parse_args(["--stage", "rl-jpeg"])
    assert a.out == compare.ROOT / "benchmark" / "results" / "rl-jpeg"
    a = compare.parse_args(["--stage", "rl-jpeg", "--out", str(tmp_path)])
    sweep, comps = compare.comparisons(a)
    (c,) = comps
    assert c.name == "rl-jpeg" and c.split == "test" and c.claims_against == "jpeg" and c.seeds == [0, 1, 2]
    assert c.algorithms == ("ddpo_sf", "ddpo_is", "rwr", "grpo")
    # the rates: summary.md's choices at 192 queries, so every rate is fixed and main() runs no sweep
    assert dict(a.lr) == dict(ddpo_sf=1e-5, ddpo_is=1e-3, rwr=1e-5, grpo=3e-3)
    c.lr = {x: [r] for x, r in dict(a.lr).items()}
    jobs = compare.plan(comps, tmp_path, {"shapes": tmp_path / "p.txt"})
    assert len(jobs) == 12
    for j in jobs:
        assert j.steps * j.queries_per_update == 2048
        flag = lambda name: j.cmd[j.cmd.index(name) + 1]
        assert flag("--reward") == "jpeg_compressibility" and flag("--model") == "tiny-shapes"
        assert int(flag("--sample-every")) * j.queries_per_update == 256  # 8 grids after step 0, equally spaced
        assert j.run_dir == tmp_path / "runs" / "rl-jpeg" / f"{j.algorithm}__s{j.seed}"
    _, (al,) = compare.comparisons(compare.parse_args(["--stage", "rl-alignment", "--budget", "512"]))
    assert al.rl_reward == "shapes_alignment" and al.claims_against == "alignment" and al.budget == 512
    # --lr overrides one entry; --stage-sweep sweeps all four at the stage's budget on the validation split
    assert dict(compare.parse_args(["--stage", "rl-jpeg", "--lr", "rwr=3e-4"]).lr)["rwr"] == 3e-4
    a = compare.parse_args(["--stage", "rl-jpeg", "--stage-sweep"])
    sweep, _ = compare.comparisons(a)
    assert a.lr == [] and sweep.budget == 2048 and sweep.split == "validation" and sweep.seeds == [100]
    assert sweep.algorithms == c.algorithms and sweep.lr["ddpo_is"] == list(compare.SWEEP_RATES)
    # without --stage: the main comparison as before
    a = compare.parse_args([])
    assert a.budget == 192 and a.algorithms == list(compare.ALGORITHMS) and a.lr == []
    assert [c.name for c in compare.comparisons(a)[1]] == ["alignment", "jpeg"]


def test_script_flags_reach_one_scripts_runs_and_the_configuration_table(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle on a blue background\n")
    a = compare.parse_args(["--stage", "rl-jpeg", "--algorithms", "ddpo_sf", "rwr", "--lr", "ddpo_sf=3e-3",
                            "--script-flags", "rwr=--beta 20 --sparse", "--seeds", "0", "--out", str(tmp_path)])
    _, (c,) = compare.comparisons(a)
    c.lr = {x: [r] for x, r in dict(a.lr).items()}
    jobs = {j.algorithm: j for j in compare.plan([c], tmp_path, {"shapes": tmp_path / "p.txt"})}
    rwr, sf = jobs["rwr"].cmd, jobs["ddpo_sf"].cmd
    i = rwr.index("--beta")
    assert rwr[i : i + 3] == ["--beta", "20", "--sparse"] and "--beta" not in sf
    assert sf[sf.index("--learning-rate") + 1] == "0.003"
    assert any("`--beta 20 --sparse`" in line for line in report._config_table(c, list(jobs.values())))
    # the script itself accepts what the benchmark passes (its own parser, not a copy of it)
    import common
    import rwr as rwr_script

    args = common.cli(rwr_script.Args, rwr[1:])
    assert args.beta == 20 and args.sparse and args.learning_rate == 1e-5


@pytest.mark.parametrize("flags, message", [
    ("rwr=--learning-rate 1", "--learning-rate is set by the benchmark itself"),
    ("rwr=--output-dir=/tmp/x", "--output-dir is set by the benchmark itself"),
    ("rwr=--resume /tmp/x", "--resume is set by the benchmark itself"),
])
def test_script_flags_never_override_the_runs_own_flags(flags, message, tmp_path):
    a = compare.parse_args(["--stage", "rl-jpeg", "--script-flags", flags, "--out", str(tmp_path)])
    _, (c,) = compare.comparisons(a)
    c.lr = {x: [r] for x, r in dict(a.lr).items()}
    with pytest.raises(SystemExit) as e:
        compare.plan([c], tmp_path, {"shapes": tmp_path / "p.txt"})
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv, message", [
    (["--script-flags", "dpo=--beta 1"], "expected ALGORITHM=FLAGS"),
    (["--script-flags", "rwr=--beta '2"], "No closing quotation"),
    (["--stage", "rl-jpeg", "--algorithms", "draft", "grpo"], "RL scripts only"),
    (["--stage-sweep"], "RL stage only"),
    (["--stage", "rl-alignment", "--evals-per-run", "0"], "at least 1"),
])
def test_rl_stage_refuses_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        compare.parse_args(argv)
    assert e.value.code != 0 and message in capsys.readouterr().err


def test_claim_difference_is_welchs_t_against_two():
    from scipy import stats

    a, b = [1.0, 2.0, 3.0], [0.0, 0.5, 1.0]
    d = analysis.difference(analysis.Sample.of(a), analysis.Sample.of(b))
    t = stats.ttest_ind(a, b, equal_var=False).statistic  # Welch's t = (mean a - mean b) / unpaired SE
    assert d["diff"] == pytest.approx(1.5) and d["diff"] / d["se"] == pytest.approx(t) and d["resolved"] is True
    close = [0.0, 1.5, 0.0]
    d2 = analysis.difference(analysis.Sample.of(close), analysis.Sample.of(b))
    assert abs(stats.ttest_ind(close, b, equal_var=False).statistic) < 2 and d2["resolved"] is False
    assert analysis.difference(analysis.Sample.of([1.0]), analysis.Sample.of(b))["resolved"] is None
    s = analysis.Sample.from_population_std(float(np.mean(a)), float(np.std(a)), 3)  # summary.json's mean_std
    assert s.sd == pytest.approx(np.std(a, ddof=1))
    rows = analysis.rl_claims(dict(ddpo_is=a, ddpo_sf=b, grpo=close))
    verdicts = {(r["a"], r["b"]): r["verdict"] for r in rows}
    assert verdicts == {("ddpo_is", "ddpo_sf"): "agrees", ("grpo", "ddpo_is"): "not resolved"}
    rows = analysis.rl_claims(dict(ddpo_is=b, ddpo_sf=a))
    assert rows[0]["verdict"] == "contradicts (DDPO-SF ahead)"


def test_gradient_claim_is_per_query():
    rl = dict(ddpo_is=[0.0, 0.1, 0.2], rwr=[-1.0, -1.1, -0.9])  # DDPO-IS is the best RL script
    far, level = analysis.Sample(1.0, 0.1, 3), analysis.Sample(0.1, 0.1, 3)
    rows = analysis.gradient_claims(rl, dict(draft=far, refl=level), rl_budget=2048, gradient_budget=192)
    by = {r["a"]: r for r in rows}
    assert {r["b"] for r in rows} == {"ddpo_is"} and by["draft"]["diff"] == pytest.approx(0.9)
    assert by["draft"]["verdict"] == "agrees" and by["refl"]["verdict"] == "not resolved"
    # the RL script ahead beyond the seeds, but with 10.7x the queries: nothing per query
    behind = analysis.Sample(-0.5, 0.1, 3)
    (row,) = analysis.gradient_claims(rl, dict(draft=behind), rl_budget=2048, gradient_budget=192)
    assert row["verdict"].startswith("not shown (DDPO-IS ahead with 10.7×")
    (row,) = analysis.gradient_claims(rl, dict(draft=far), rl_budget=96, gradient_budget=192)
    assert row["verdict"].startswith("not shown (DRaFT-1 ahead with 2×")


def test_rl_stage_report_has_curves_claims_and_the_gradient_reference(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from benchmark import report

    a = compare.parse_args(["--stage", "rl-jpeg", "--smoke", "--out", str(tmp_path), "--seeds", "0", "1", "2"])
    _, (c,) = compare.comparisons(a)
    c.lr = {x: [r] for x, r in dict(a.lr).items()}
    jobs = compare.plan([c], tmp_path, {"simple_animals": tmp_path / "p.txt"})
    reward = c.rl_reward
    finals = dict(ddpo_sf=[0.0, 0.1, 0.2], ddpo_is=[1.0, 2.0, 3.0], rwr=[0.0, 0.5, 1.0], grpo=[1.0, 2.5, 2.0])
    for j in jobs:  # base -10: final Δ = finals
        write_run(j.run_dir, int(j.queries_per_update), [0.0] * j.steps, {0: 0.0, j.steps: 1.0},
                  final_eval=dict(scores=dict(train={reward: -10 + finals[j.algorithm][j.seed]},
                                              heldout={reward: -10.0})))
    base = compare.base_file(tmp_path, c, 1.0)
    base.parent.mkdir(parents=True)
    base.write_text(json.dumps(dict(config=dict(eta=1.0, split="test"), seconds=1.0,
                                    scores=dict(train={reward: -10.0}, heldout={reward: -10.0}))))
    # the main comparison `jpeg` on the same model: DRaFT-1 +5 ± 0 at 48 queries (η = 0 base -20)
    ref = tmp_path / "main" / "summary.json"
    ref.parent.mkdir()
    ref.write_text(json.dumps(dict(comparisons=dict(jpeg=dict(model="tiny", budget=48, base={"0.0": dict(
        scores=dict(train={reward: -20.0}))}, summary=dict(algorithms=dict(
            draft=dict(seeds=[0, 1], final_eval=dict(train={reward: [-15.0, 0.5]})),
            ddpo_is=dict(seeds=[0, 1], final_eval=dict(train={reward: [0.0, 0.0]})))))))))
    other = tmp_path / "other" / "summary.json"  # the same on another model: not comparable, skipped
    other.parent.mkdir()
    other.write_text(ref.read_text().replace('"model": "tiny"', '"model": "tiny-shapes"').replace("-15.0", "-99.0"))
    monkeypatch.setattr(report, "REFERENCE_SUMMARIES", (tmp_path / "missing.json", other, ref))
    result = report.write([c], jobs, tmp_path, elapsed=1.0, final=True, title="RL stage")
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("# RL stage\n")
    assert all((tmp_path / f"rl-jpeg_reward_vs_{x}.png").is_file() for x in ("queries", "seconds"))
    rows = {(r["a"], r["b"]): r for r in result["comparisons"]["rl-jpeg"]["claims"]}
    assert rows[("ddpo_is", "ddpo_sf")]["diff"] == pytest.approx(1.9) and rows[("ddpo_is", "ddpo_sf")]["resolved"]
    assert rows[("grpo", "ddpo_is")]["verdict"] == "not resolved"
    # per query: DRaFT-1's +5 (sd 0.5·√2 over 2 seeds) at 48 queries against DDPO-IS's +2 at 32: no more queries
    draft = rows[("draft", "ddpo_is")]
    assert draft["diff"] == pytest.approx(3.0) and draft["se"] == pytest.approx(math.sqrt(0.5 / 2 + 1 / 3))
    assert draft["verdict"] == "not shown (DRaFT-1 ahead with 1.5× the queries)"
    assert ("ddpo_is", "ddpo_is") not in rows  # the reference's RL scripts are not gradient scripts
    assert "| DDPO-IS ahead of DDPO-SF (DDPO) | DDPO-IS +2 ± 1 (3) | DDPO-SF +0.1 ± 0.1 (3) | +1.9 |" in md
    assert "resolved when |A − B| > 2 SE" in md and "(`" in md
    monkeypatch.setattr(report, "REFERENCE_SUMMARIES", (tmp_path / "missing.json",))
    report.write([c], jobs, tmp_path, elapsed=1.0, final=True)
    assert "Per reward query against the gradient scripts: not in this stage" in (tmp_path / "summary.md").read_text()


def script_in_process(cmd: list[str]) -> int:
    """`compare._run` for the stage tests: the script command run in this process, parsed by the script's own
    command line parser (the smoke test below runs the scripts as subprocesses)."""
    import importlib

    import common

    module = importlib.import_module(cmd[0].removesuffix(".py"))
    module.main(common.cli(module.Args, cmd[1:]))
    return 0


def smoke_stage_of_ddpo_is(tmp_path):
    """The rl-jpeg stage's smoke comparison cut to DDPO-IS at 1e-2 and seed 0, and its prompt files."""
    a = compare.parse_args(["--stage", "rl-jpeg", "--smoke", "--seeds", "0", "--algorithms", "ddpo_is",
                            "--out", str(tmp_path)])
    _, (c,) = compare.comparisons(a)
    c.lr = {"ddpo_is": [1e-2]}
    return c, {c.prompts: compare.training_prompt_file(c.prompts, tmp_path)}


def test_a_stopped_stage_run_resumes_from_its_last_checkpoint_to_the_same_lora(tmp_path, monkeypatch):
    """An RL stage's run checkpoints with every grid; stopped midway (here: its command cut to the first grid's
    updates), the next invocation continues it with --resume and ends on the LoRA an uninterrupted run writes, bit
    for bit. A run left by another command is redone from scratch."""
    import threading

    import torch
    from safetensors.torch import load_file

    monkeypatch.setattr(compare, "_run", lambda cmd, log, fork: script_in_process(cmd))
    c, prompts = smoke_stage_of_ddpo_is(tmp_path)
    whole, = compare.plan([c], tmp_path / "whole", prompts)
    stopped, = compare.plan([c], tmp_path / "stopped", prompts)
    flag = lambda cmd, name: cmd[cmd.index(name) + 1]
    half = int(flag(stopped.cmd, "--save-every"))
    assert c.checkpoints and half == stopped.steps // 2 == int(flag(stopped.cmd, "--sample-every"))
    locks = threading.Lock(), threading.Lock()
    compare.execute(whole, tmp_path, False, *locks, skip_eval=True, fork=False)

    stopped.run_dir.mkdir(parents=True)
    (stopped.run_dir / "bench_run.json").write_text(json.dumps(dict(cmd=stopped.cmd)))  # what execute() writes first
    cut = list(stopped.cmd)
    cut[cut.index("--steps") + 1] = str(half)  # the run as far as its first checkpoint
    compare._call(lambda: cut, tmp_path / "cut.log", fork=False)
    assert compare.resumable(stopped)[0] == half and not compare.run_finished(stopped)
    what = compare.execute(stopped, tmp_path, False, *locks, skip_eval=True, fork=False)
    info = json.loads((stopped.run_dir / "bench_run.json").read_text())
    assert what.startswith("trained") and info["resumed_at_update"] == half and info["cmd"] == stopped.cmd
    assert compare.run_finished(stopped)
    ours, theirs = (load_file(j.run_dir / "pytorch_lora_weights.safetensors") for j in (stopped, whole))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    (stopped.run_dir / "bench_run.json").write_text(json.dumps(dict(cmd=stopped.cmd + ["--x"])))
    assert compare.resumable(stopped) is None  # another command's checkpoint: not continued


def test_a_failed_attempt_is_retried_from_what_it_left(tmp_path, monkeypatch):
    """A stage run whose process dies is retried: before its first checkpoint in an emptied run directory (the failed
    attempt's metrics.jsonl made the script refuse the directory, exit 2, when a GRPO run was killed at update 55 of
    512), after it from that checkpoint with --resume; either way the LoRA equals an uninterrupted run's, bit for
    bit."""
    import threading

    import torch
    from safetensors.torch import load_file

    calls = []

    def in_process(cmd, log, fork):  # the first attempt of a run dies as `die` says; the rest run
        calls.append(cmd)
        if not die or len(calls) > 1:
            return script_in_process(cmd)
        if die == "before the first checkpoint":  # what a process killed before it leaves
            run_dir = Path(cmd[cmd.index("--output-dir") + 1])
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "metrics.jsonl").write_text(json.dumps(dict(step=1)) + "\n")
            return 143
        cut = list(cmd)
        cut[cut.index("--steps") + 1] = cut[cut.index("--save-every") + 1]  # dies after its first checkpoint
        script_in_process(cut)
        return 143

    monkeypatch.setattr(compare, "_run", in_process)
    monkeypatch.setattr(compare.time, "sleep", lambda seconds: None)
    c, prompts = smoke_stage_of_ddpo_is(tmp_path)
    locks = threading.Lock(), threading.Lock()
    loras = {}
    for die in (None, "before the first checkpoint", "after the first checkpoint"):
        calls.clear()
        job, = compare.plan([c], tmp_path / str(die), prompts)
        assert compare.execute(job, tmp_path, False, *locks, skip_eval=True, fork=False).startswith("trained")
        assert len(calls) == (1 if die is None else 2) and compare.run_finished(job)
        assert ("--resume" in calls[-1]) == (die == "after the first checkpoint"), calls[-1]
        loras[die] = load_file(job.run_dir / "pytorch_lora_weights.safetensors")
    whole = loras.pop(None)
    for lora in loras.values():
        assert lora.keys() == whole.keys() and all(torch.equal(lora[k], whole[k]) for k in whole)


def test_rl_stage_smoke_runs_end_to_end(tmp_path, monkeypatch):
    """`compare.py --stage rl-jpeg --smoke`, cut to two scripts and one seed so that it takes well under a minute:
    the stage's command lines run, are evaluated and reported."""
    pytest.importorskip("matplotlib")
    import torch

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HF_HUB_OFFLINE", "PYTHONUNBUFFERED"):  # main() sets them
        monkeypatch.delenv(name, raising=False)  # restored after the test
    threads = torch.get_num_threads()
    try:
        compare.main(["--stage", "rl-jpeg", "--smoke", "--out", str(tmp_path), "--seeds", "0", "--budget", "16",
                      "--algorithms", "ddpo_is", "grpo", "--no-fork-server"])
    finally:
        torch.set_num_threads(threads)  # main() sets one thread for this process too
    summary = json.loads((tmp_path / "summary.json").read_text())["comparisons"]["rl-jpeg"]
    assert summary["runs_finished"] == summary["runs_expected"] == 2 and "sweep" not in summary
    for algo in ("ddpo_is", "grpo"):
        run = tmp_path / "runs" / "rl-jpeg" / f"{algo}__s0"
        assert (run / "test_eval.json").is_file()
        assert [json.loads(x)["step"] for x in (run / "eval.jsonl").read_text().splitlines()] == [0, 2, 4]
    assert [r["verdict"] for r in summary["claims"]] == ["too few seeds"]
