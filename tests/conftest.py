import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never touch the network
# One torch thread: pytest.ini runs two workers (pytest-xdist) on a 2-core machine, the tiny models are far below the
# size where intra-op threads help, and two OpenMP threads waiting for each other on a busy machine made a tiny UNet
# call ~40x slower (2.7 s instead of 0.07 s).
torch.set_num_threads(1)
# The same for every subprocess a test starts (the scripts through their CLI, torchrun, servers): without it each
# took torch's default of 2 threads next to two busy workers, and the SD1.4-sized CLI runs took 153 s instead of ~40.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from benchmark.precision import randomize_lora  # noqa: E402,F401  (the tests' LoRA that changes the model)


def read_metrics(run_dir):
    """A run's metrics.jsonl as a list of dicts, one per optimizer update."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def tiny_pipe():
    import common

    return common.load_pipeline("tiny", lora_rank=4)


@pytest.fixture
def serve_in_thread():
    """Start RewardServer(s) (`rewards.serve`) in threads of this process on loopback; all are shut down at the end.
    Returns start(spec, **limits) -> the server's URL."""
    import threading

    import rewards
    from rewards.serve import RewardServer

    servers = []

    def start(spec: str, **limits) -> str:
        server = RewardServer(("127.0.0.1", 0), rewards.load(spec), spec, **limits)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
