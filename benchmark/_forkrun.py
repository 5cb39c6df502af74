"""Run a script as `python SCRIPT ARGS...` would, inside a process forked from compare.py's fork server (whose
third-party imports are already loaded, see _preload.py). Kept in its own small module so that the fork server
can import the target without importing compare.py."""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, argv: list[str], log: str) -> None:
    """Child process: stdout and stderr appended to `log`, cwd and sys.path[0] the repository root, sys.argv as on
    the command line, then the script runs as __main__. Its exit status is the process's exit code."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    sys.argv = [script, *argv]
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
