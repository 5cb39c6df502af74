import json
import os
import sys
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Script:
    """What the per-script tests know about one training script, `{name}.py`. Every per-script test reads SCRIPTS;
    adding a script is one entry here (tests/README.md lists what else a new script needs)."""

    kind: str
    """"rl": the reward is a black box (any reward); "gradient": backpropagates through a differentiable reward"""
    flags: tuple[str, ...]
    """a small valid run on `--model tiny`: batch sizes and the algorithm's own knobs; the tests add --model, --reward,
    --steps, --num-inference-steps (≥ 3) and the run's bookkeeping flags"""
    updates_per_batch: int = 1
    """optimizer updates per sampled batch under `flags` (checkpoints, and so --save-every, fall between batches)"""
    args: dict = field(default_factory=dict)
    """keyword arguments of `Args` for the in-process tests of `accumulate_gradient` (4 inference steps)"""
    extra: tuple = ()
    """gradient scripts: the positional arguments of `accumulate_gradient` after `args` (ReFL's m, AlignProp's K)"""
    unet_calls_with_grad: int = 0
    """gradient scripts: UNet calls with gradient per chunk under `args` (each one more forward when checkpointed)"""
    published_nt: int = 0
    """RL scripts: the images × timesteps one update averages its loss over under the published settings (DDPO: 64
    images × 50 steps), which decides the size of the gradient half precision must keep (test_precision)"""

    @property
    def reward(self) -> str:
        """A reward the tiny model moves and the script accepts: JPEG size, or its differentiable stand-in."""
        return "jpeg_compressibility" if self.kind == "rl" else "jpeg_compressibility_diff"


RL_FLAGS = ("--batch-size", "4", "--sample-batch-size", "4", "--train-batch-size", "2")
SCRIPTS = {
    "ddpo_sf": Script("rl", RL_FLAGS, published_nt=64 * 50),
    "ddpo_is": Script("rl", (*RL_FLAGS, "--num-minibatches", "2"), updates_per_batch=2,
                      published_nt=16 * 50),
    "grpo": Script("rl", (*RL_FLAGS, "--num-minibatches", "2", "--group-size", "2", "--kl-beta", "0.04",
                          "--shared-noise"), updates_per_batch=2, published_nt=16 * 50),
    "rwr": Script("rl", (*RL_FLAGS, "--num-minibatches", "2", "--num-epochs", "1", "--images-per-prompt", "2"),
                  updates_per_batch=2, published_nt=16),
    "draft": Script("gradient", ("--batch-size", "2", "--k", "2"), args=dict(k=2), unet_calls_with_grad=2),
    "draft_lv": Script("gradient", ("--batch-size", "2"), args=dict(num_copies=2), unet_calls_with_grad=3),
    "refl": Script("gradient", ("--batch-size", "2", "--max-step", "3"), args=dict(max_step=4), extra=(2,),
                   unet_calls_with_grad=1),
    "alignprop": Script("gradient", ("--batch-size", "2"), args=dict(truncation="fixed", k=4), extra=(4,),
                        unet_calls_with_grad=4),
}


def scripts(kind: str | None = None) -> list[str]:
    """The registered scripts' names (of one kind), in registry order: the parameters of every per-script test."""
    return [name for name, s in SCRIPTS.items() if kind in (None, s.kind)]


def script_args(name: str, *flags: str) -> list[str]:
    """The command-line arguments of a small run of `name` on tiny: `--model tiny --reward R {registry flags}
    {flags}` (a flag given twice takes its last value)."""
    s = SCRIPTS[name]
    return ["--model", "tiny", "--reward", s.reward, *s.flags, *flags]


def script_cli(name: str, *flags: str) -> list[str]:
    """`python {name}.py` with `script_args(name, *flags)`, as a subprocess's argv."""
    return [sys.executable, str(ROOT / f"{name}.py"), *script_args(name, *flags)]


def read_metrics(run_dir):
    """A run's metrics.jsonl as a list of dicts, one per optimizer update."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def tiny_pipe():
    import common

    return common.load_pipeline("tiny", lora_rank=4)


def randomize_lora(pipe, std=0.05, seed=0):
    """Give the zero-initialised LoRA B matrices non-zero values so that the adapter changes the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


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
