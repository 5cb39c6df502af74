"""One script with `common/` and `rewards/`, copied into an empty folder, runs on its own (DESIGN.md: an engineer
copies one script into another project): nothing in `common/` or `rewards/` imports `shapes/`, `benchmark/` or a
script at import time, and asking for the testbed there is one clear error, not an ImportError."""

import ast
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, read_metrics, scripts


def test_one_script_with_common_and_rewards_runs_alone(tmp_path):
    for name in ("common", "rewards"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "draft_lv.py", tmp_path)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH="")  # nothing of the repository
    cmd = [sys.executable, "draft_lv.py", "--model", "tiny", "--reward", "jpeg_compressibility_diff", "--steps", "1",
           "--batch-size", "2", "--num-inference-steps", "3", "--num-sample-images", "2", "--output-dir", "run"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1]
    assert not (tmp_path / "shapes").exists()

    for flags, message in ((["--model", "tiny-shapes"], "belongs to the tiny-shapes testbed"),  # its prompts
                           (["--model", "tiny-shapes", "--prompts", "simple_animals"], "is the testbed's folder"),
                           (["--model", "tiny-shapes-flow", "--prompts", "simple_animals"],
                            "--model tiny-shapes-flow is the testbed's folder"),
                           (["--reward", "shapes_alignment"], "need the tiny-shapes testbed's shapes/ folder")):
        proc = subprocess.run([*cmd[:-2], "--output-dir", "run2", *flags], capture_output=True, text=True, env=env,
                              timeout=300, cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert message in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("script", scripts())
def test_every_script_imports_only_common_rewards_and_libraries(script):
    """What the run above shows for one script, every script shows statically: no import (at the top or inside a
    function) of another script, of the testbed or of the benchmarks, so each one copies with common/ and rewards/
    alone."""
    tree = ast.parse((ROOT / f"{script}.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert {"common", "rewards"} <= imported
    local = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert imported & local <= {"common", "rewards"}, sorted(imported & local)
