"""benchmark/gpu_check.py, the prepared GPU check (issue 22), in its CPU mode: every item at a tiny size through the
real command line, so that the command a GPU session runs cannot rot; its refusals; the component cache it uses."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

SCRIPTS = ["ddpo_sf", "ddpo_is", "draft", "draft_lv", "refl", "alignprop", "grpo", "rwr"]
RL = ["ddpo_sf", "ddpo_is", "grpo", "rwr"]
SPEED = ["baseline", "tf32", "no-sdpa", "channels-last"]
EXPECTED = ([f"update/{s}/bf16" for s in SCRIPTS] + [f"memory/{s}/bf16" for s in RL]
            + ["cosine/ddpo_sf", "cosine/draft", "ratio/stored", "ratio/reevaluate"] + [f"speed/{f}" for f in SPEED]
            + [f"update/{s}/fp16" for s in SCRIPTS] + ["speed/compile"])
# seconds at the published batch / seconds per update of the measured batch of 8, from the published settings:
# 64 images in 1 (DDPO-SF), 4 (DDPO-IS, GRPO: 4 minibatches) or 16 (RWR: 4 epochs × 4) updates, against 8 images in
# 1, 2 (2 minibatches of 4) and 8 (4 epochs × 2) updates
EXTRAPOLATION = {"ddpo_sf": 8 * 1 / 1, "ddpo_is": 8 * 2 / 4, "grpo": 8 * 2 / 4, "rwr": 8 * 8 / 16}


def gpu_check(out, *flags, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "benchmark" / "gpu_check.py"), "--out", str(out), "--device",
                           "cpu", "--small", *flags], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def finite(*values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def markdown_rows(text):
    """The body rows of every markdown table, as lists of cells."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines
            if not set(line) <= set("|-") and not line.startswith(("| script", "| --reevaluate", "| flag"))]


def test_every_item_runs_in_the_cpu_mode(tmp_path):
    proc = gpu_check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr + (tmp_path / "gpu_check.log").read_text()
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    items = {i["id"]: i for i in report["items"]}
    assert [i["id"] for i in report["items"]] == EXPECTED  # the order: most important first
    assert all(i["status"] == "ok" for i in items.values()), [(i["id"], i.get("error")) for i in items.values()]
    for s in SCRIPTS:
        for precision in ("bf16", "fp16"):
            f = items[f"update/{s}/{precision}"]["figures"]
            assert finite(f["seconds_measured"], f["seconds_per_update"], f["peak_gb"]) and f["peak_gb"] > 0
            assert f["batch"] == (8 if s in RL else 4)  # the RL scripts' measured batch; the published 4
            published = f["seconds_measured"] * EXTRAPOLATION.get(s, 1)
            assert math.isclose(f["seconds_per_update"], published, rel_tol=1e-9)
    for s in RL:
        f = items[f"memory/{s}/bf16"]["figures"]
        # tiny's latents at 8 px: 4 × 4 × 4 float32 values, 16 images, T = 2 against the run's T = 1
        assert f["batch"] == 16 and f["trajectory_gb"] == 16 * (2 - 1) * 64 * 4 / 2**30
        assert f["peak_gb_at_published_T"] == f["peak_gb"] + f["trajectory_gb"] and f["peak_gb"] > 0
    for s, rows in (("ddpo_sf", 2), ("draft", 1)):  # DDPO-SF: t indices 0 and T − 1 = T // 2 of T = 2
        cos = items[f"cosine/{s}"]["figures"]["rows"]
        assert len(cos) == rows and all(-1 <= r[k] <= 1 for r in cos for k in ("fp16", "bf16"))
    assert finite(items["cosine/ddpo_sf"]["figures"]["rows"][0]["fp16_unscaled"])
    for name in ("stored", "reevaluate"):
        f = items[f"ratio/{name}"]["figures"]
        assert finite(f["ratio_dev_mean"], f["ratio_dev_max"], f["clipfrac"]) and f["pairs"] == 4 * 2  # 4 samples × T
        # the script's clipfrac (float32 means over 2 chunks, weighted) is the fraction over the recorded ratios
        assert math.isclose(f["clipfrac"], f["clipfrac_recomputed"], abs_tol=1e-6)
    assert items["ratio/reevaluate"]["figures"]["clipfrac"] == 0  # re-evaluated in the training layout: on-policy
    for flag in SPEED + ["compile"]:
        f = items[f"speed/{flag}"]["figures"]
        assert finite(f["seconds_measured"], f["first_update_s"]) and f["updates"] == 2

    rows = markdown_rows((tmp_path / "gpu_check.md").read_text())
    assert len(rows) == len(EXPECTED) + 1  # one row per item, two for DDPO-SF's cosine (two timesteps)
    assert all(row[-1].startswith("ok") for row in rows)  # fp16's skipped updates (JPEG's overflows) are noted
    assert all("–" not in row[:6] for row in rows if len(row) == 8)  # every figure of the update table
    assert "**One update per script" in proc.stdout  # the tables end the output too


def test_a_failing_item_is_recorded_and_the_next_one_runs(tmp_path):
    """A batch of 12 does not split into DDPO-SF's sampling chunks of 8 (a batch below 8 would set the chunk to the
    batch, bench_sd14.script_flags): that item fails with the script's own message, and the item after it runs."""
    proc = gpu_check(tmp_path, "--only", "update/ddpo_sf/bf16,update/refl/bf16", "--rl-batch-size", "12")
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    failed, ran = json.loads((tmp_path / "gpu_check.json").read_text())["items"]
    assert failed["status"] == "error" and "--sample-batch-size 8" in failed["error"]
    assert ran["status"] == "ok" and ran["figures"]["seconds_measured"] > 0
    assert "Traceback" in (tmp_path / "gpu_check.log").read_text()  # the traceback, for whoever reads the log
    assert "--sample-batch-size 8" in (tmp_path / "gpu_check.md").read_text()


def test_a_spent_budget_starts_no_item_and_leaves_a_valid_report(tmp_path):
    proc = gpu_check(tmp_path, "--budget-s", "0")
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    items = json.loads((tmp_path / "gpu_check.json").read_text())["items"]
    assert [i["id"] for i in items] == EXPECTED
    assert all(i["status"] == "skipped" and "--budget-s 0 spent" in i["error"] for i in items)
    assert all(row[-1].startswith("skipped") for row in markdown_rows((tmp_path / "gpu_check.md").read_text()))


def test_missing_packages_end_in_one_line(tmp_path, monkeypatch, capsys):
    from benchmark import gpu_check

    monkeypatch.setitem(gpu_check.NEEDED, "no_such_module_xyz", "no-such-package")
    assert gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--small"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu_check: missing Python packages: no-such-package") and err.count("\n") == 1
    assert "no-such-package" in json.loads((tmp_path / "gpu_check.json").read_text())["error"]


def test_a_missing_dependency_of_a_checked_package_ends_in_one_line(tmp_path):
    """tyro is installed but its docstring_parser is not (shadowed here by a module that fails to import, as a
    missing one does): the worker cannot start, and the run ends in one line naming it, every item skipped."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "docstring_parser.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'docstring_parser'\", name='docstring_parser')\n")
    env = dict(os.environ, PYTHONPATH=str(shadow))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmark" / "gpu_check.py"), "--out", str(tmp_path / "out"),
                           "--device", "cpu", "--small"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: cannot import docstring_parser (No module named 'docstring_parser'): pip install -r "
        "requirements.txt"]
    items = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["items"]
    assert all(i["status"] == "skipped" and "docstring_parser" in i["error"] for i in items)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_no_cuda_device_ends_in_one_line(tmp_path, capsys):
    from benchmark import gpu_check

    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu_check: no CUDA device") and "--device cpu --small" in err and err.count("\n") == 1


def test_the_component_cache_gives_fresh_modules_over_the_same_weights():
    """Each load gets modules equal to a fresh build in the asked dtype (a cast of the float32 build), over the same
    storage, so that load_pipeline's changes to one (dtype, device, adapters) never reach the next."""
    import common
    from benchmark.gpu_check import ComponentCache

    build = ComponentCache().wrap(common.models.tiny_components)
    first, second = build(0, torch.bfloat16), build(0, torch.bfloat16)
    reference = common.models.tiny_components(0, torch.bfloat16)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = first[name].state_dict(), reference[name].state_dict()
        assert ours.keys() == theirs.keys()
        assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
        assert all(p.data_ptr() == q.data_ptr() for p, q in zip(first[name].parameters(), second[name].parameters()))
    first["unet"].conv_in.weight.data = first["unet"].conv_in.weight.data.float()
    assert build(0, torch.bfloat16)["unet"].conv_in.weight.dtype == torch.bfloat16
    assert first["scheduler"] is not second["scheduler"]  # set_timesteps changes a scheduler's state
