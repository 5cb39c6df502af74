"""benchmark/compare.py's data logic on synthetic run directories (no script is run): CSV rows, curves, spread
over seeds, threshold and queries-to-threshold, the configuration's equal budget, and the report files."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmark import analysis, compare


def write_run(run_dir: Path, queries_per_update: int, rewards: list[float], evals: dict[int, float],
              step_seconds: float = 1.0, wall: float = 10.0, final_eval: dict | None = None) -> Path:
    """A run directory as a script and compare.py leave it: metrics.jsonl, eval.jsonl, bench_run.json."""
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for i, r in enumerate(rewards, 1):
            f.write(json.dumps(dict(step=i, reward_mean=r, reward_queries=i * queries_per_update,
                                    step_seconds=step_seconds, seconds=2.0 + i * step_seconds)) + "\n")
    with open(run_dir / "eval.jsonl", "w") as f:
        for step, value in evals.items():
            f.write(json.dumps(dict(step=step, eval_reward=value, scores=[value])) + "\n")
    (run_dir / "bench_run.json").write_text(json.dumps(dict(cmd=["x.py"], wall_seconds=wall)))
    if final_eval is not None:
        (run_dir / "final_eval.json").write_text(json.dumps(final_eval))
    return run_dir


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


def test_every_algorithm_gets_the_same_budget():
    c = compare.Comparison("alignment", "t", "tiny-shapes", "shapes", "shapes_heldout", "shapes_alignment",
                           "shapes_alignment", ["shapes_exact_match"], budget=768, seeds=[0], num_inference_steps=20,
                           guidance_scale=3.0, lr=dict(rl=1e-3, grad=1e-3))
    for algo in compare.ALGORITHMS:
        flags, steps, per_update, settings = compare.script_settings(c, algo)
        assert steps * per_update == 768, algo
        assert flags[flags.index("--steps") + 1] == str(steps)
    assert compare.script_settings(c, "draft_lv")[1] == 64  # 4 images × (n + 1) = 12 queries per update
    assert compare.script_settings(c, "ddpo_is")[3]["clip_range"] == pytest.approx(1e-4 * 1e-3 / 3e-4)
    with pytest.raises(ValueError, match="not a multiple"):
        compare.script_settings(compare.Comparison(**{**c.__dict__, "budget": 100}), "ddpo_sf")


def test_plan_orders_seeds_first_and_skips_finished(tmp_path):
    a = compare.parse_args(["--smoke", "--out", str(tmp_path)])
    comps = compare.comparisons(a)
    files = {c.prompts: tmp_path / "p.txt" for c in comps}
    jobs = compare.plan(comps, tmp_path, files)
    assert len(jobs) == 8 * 2 + 8 * 1
    assert [j.seed for j in jobs[:14]] == [0] * 14 and {j.comparison.name for j in jobs[:14]} == {"alignment", "jpeg"}
    job = jobs[0]
    assert not compare.run_finished(job)
    job.run_dir.mkdir(parents=True)
    (job.run_dir / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (job.run_dir / "bench_run.json").write_text(json.dumps(dict(cmd=job.cmd)))
    assert compare.run_finished(job)
    (job.run_dir / "bench_run.json").write_text(json.dumps(dict(cmd=job.cmd + ["--x"])))
    assert not compare.run_finished(job)  # another configuration: rerun


def test_report_writes_outputs_for_partial_results(tmp_path):
    pytest.importorskip("matplotlib")
    a = compare.parse_args(["--smoke", "--out", str(tmp_path), "--comparisons", "alignment",
                            "--algorithms", "draft", "ddpo_sf"])
    comps = compare.comparisons(a)
    jobs = compare.plan(comps, tmp_path, {"simple_animals": tmp_path / "p.txt"})
    for j in jobs[:3]:  # 3 of 4 runs finished
        write_run(j.run_dir, int(j.queries_per_update), list(np.linspace(0, 1, j.steps)), {0: 0.0, j.steps: 1.0},
                  final_eval=dict(scores=dict(train={"jpeg_compressibility_diff": -1.0},
                                              heldout={"jpeg_compressibility_diff": -2.0}), seconds=1.0))
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


def test_evaluation_redone_when_a_reward_or_the_image_count_changes(tmp_path):
    c = compare.Comparison("alignment", "t", "tiny-shapes", "shapes", "shapes_heldout", "shapes_alignment",
                           "shapes_alignment", ["shapes_exact_match", "shapes_alignment"], budget=96, seeds=[0],
                           num_inference_steps=20, guidance_scale=7.5, lr=dict(rl=1e-3, grad=1e-3), eval_images=48)
    path = tmp_path / "final_eval.json"
    assert not compare.eval_done(path, c)
    path.write_text(json.dumps(dict(config=dict(num_images=48), scores=dict(train=dict(shapes_exact_match=0.1)))))
    assert not compare.eval_done(path, c)  # shapes_alignment missing
    path.write_text(json.dumps(dict(config=dict(num_images=48),
                                    scores=dict(train=dict(shapes_exact_match=0.1, shapes_alignment=-3.0)))))
    assert compare.eval_done(path, c)
    c.eval_images = 96
    assert not compare.eval_done(path, c)
