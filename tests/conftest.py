import copy
import json
import math
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

from benchmark.precision import randomize_lora  # noqa: E402,F401  (the tests' LoRA that changes the model)


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


def tensor_digest(tensors: dict) -> str:
    """SHA-256 of named tensors (name, dtype, shape and bytes of each, sorted by name): committed weights, bit for bit."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


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


# --- float32 tolerances (issue 21) -------------------------------------------------------------------------------
# A float32 result depends on the CPU's kernels (a matmul's or a convolution's summation order, the vector width), so
# two float32 computations that differ in any operation or batch layout agree only up to rounding, by an amount no test
# may take from what passed on one machine. Such a test either makes both sides compute identical operations in the
# same layout and compares exactly, or compares the float32 result against a float64 reference (whose own rounding,
# 2^-53, is negligible) within the bound below.
#
# The bound (a model, stated rather than proved): a float32 computation that rounds along a path of N roundings has a
# normwise relative error of about √N·u (u = 2^-24): rounding errors of random sign add like a random walk (Higham &
# Mary, "A new approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 2019), through layers whose
# normalisations keep the activations' scale, so that no layer amplifies a relative error by much. Where a step does
# amplify one (classifier-free guidance: ε̂ = (1 − w)·ε(∅) + w·ε(c) turns a relative error δ of ε into up to
# (2w − 1)·δ), the test states that gain. N counts every dot product's terms (`roundings`). On this project's CPU
# (AMD EPYC) the errors measured are 20 to 1000 times below the bound: the margin for another CPU's kernels, which
# round differently but not by that much more. An error in the code (a wrong step, weight, stop-gradient, pairing
# or guidance weight) is far above it; a guidance weight off by 0.1% is, for one UNet call
# (test_ddim_logprob's test_guided_noise_pred_is_cfg_combination), though not through a whole sampling chain.

U32 = 2.0**-24  # float32's unit roundoff: one rounding changes a value by at most this, relatively
U64 = 2.0**-53  # float64's


def roundings(*modules: torch.nn.Module) -> int:
    """N for one forward pass through `modules`: twice the summed dot-product lengths of their linear and convolution
    layers (one rounding per product term), the factor 2 counting attention's products and the normalisations' sums,
    which are fewer. A backward pass computes two such products per layer (the input's and the weight's gradient):
    count forward and backward as 3·N."""
    n = 0
    for module in modules:
        for m in module.modules():
            if isinstance(m, torch.nn.Linear):
                n += m.in_features
            elif isinstance(m, torch.nn.modules.conv._ConvNd):
                n += m.in_channels // m.groups * math.prod(m.kernel_size)
    return 2 * n


def rounding_tolerance(n: int, gain: float = 1.0, u: float = U32) -> float:
    """The normwise relative error bound gain·√N·u of a computation of N roundings (see above), float32 by default."""
    return gain * math.sqrt(n) * u


def pair_tolerance(t: float) -> float:
    """Two computations of one value, each within t (normwise, relative) of it: ‖a − b‖ ≤ 2t/(1 − t)·‖b‖."""
    return 2 * t / (1 - t)


def assert_normwise_close(ours, reference, tolerance: float, msg: str = ""):
    """‖ours − reference‖ ≤ tolerance·‖reference‖ over all elements (a tensor, or a list of tensors taken as one
    vector). Normwise, not per element: an element near zero (a cancellation) has a large relative error that says
    nothing about the computation; the bounds above are normwise."""
    if isinstance(ours, (list, tuple)):
        ours, reference = (torch.cat([t.flatten() for t in ts]) for ts in (ours, reference))
    ours, reference = ours.detach().double(), reference.detach().double()
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    error, scale = (ours - reference).norm().item(), reference.norm().item()
    assert scale > 0 and error <= tolerance * scale, \
        f"{msg} ‖ours − reference‖ = {error:.3g} > {tolerance:.3g} · ‖reference‖ = {tolerance * scale:.3g}"


def float64_scheduler(scheduler):
    """A copy of a DDIM scheduler whose ᾱ are float64 (the same values, exactly): diffusers' step computes 1 − ᾱ and
    its square roots in ᾱ's dtype, which in a float64 reference must be float64."""
    scheduler = copy.deepcopy(scheduler)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    return scheduler


def float64_copy(pipe):
    """A pipeline of the same class whose UNet (with its LoRA), VAE and scheduler are float64 copies, for references:
    the same weights, every operation in float64 (common/ finds the family by the pipeline's class). The text encoders
    are the original float32 ones, not to be used: a reference takes the float32 prompt embeddings, converted exactly,
    so that both sides start from the same numbers."""
    import inspect

    unet, vae = (copy.deepcopy(m).to(torch.float64) for m in (pipe.unet, pipe.vae))
    extra = {"requires_safety_checker": False} \
        if "requires_safety_checker" in inspect.signature(type(pipe).__init__).parameters else {}
    return type(pipe)(**{**pipe.components, "unet": unet, "vae": vae, "scheduler": float64_scheduler(pipe.scheduler)},
                      **extra)


def log_prob_tolerance(scheduler, eps, t, x, prev, eta, eps_tolerance, u=U32):
    """Per sample, a bound on how far apart two evaluations (unit roundoff u) of `step_with_logprob`'s
    log p(prev | x) can be when each one's ε̂ is within eps_tolerance (normwise, over the batch) of the exact ε̂.
    μ = a·x + c·ε̂ is linear in ε̂, so ‖δμ‖ ≤ |c|·2·eps_tolerance·‖ε̂‖; log p = −‖prev − μ‖²/(2Dσ²) − log σ − ½·log 2π
    moves by at most ‖δμ‖·(‖prev − μ‖ + ‖δμ‖)/(Dσ²) (Cauchy–Schwarz); and each evaluation rounds its mean of D terms
    by at most √(D + 8)·u times their mean size (the model above)."""
    import common

    eps, x, prev = eps.double(), x.double(), prev.double()
    mean, std = common.step_mean_std(scheduler, eps, t, x, eta)
    c_eps = mean - common.step_mean_std(scheduler, torch.zeros_like(eps), t, x, eta)[0]  # c·ε̂
    per_sample = lambda v: v.flatten(1).norm(dim=1)  # noqa: E731
    d, std = prev[0].numel(), std.flatten()
    dmu = per_sample(c_eps) / per_sample(eps) * 2 * eps_tolerance * eps.norm()
    distance = per_sample(prev - mean)
    terms = distance**2 / (2 * d * std**2) + std.log().abs() + 0.5 * math.log(2 * math.pi)
    return dmu * (distance + dmu) / (d * std**2) + 2 * math.sqrt(d + 8) * u * terms


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """A script run in-process installs SIGINT/SIGTERM handlers (common.StopSignal); give pytest its own back."""
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def directional_derivatives(f, params, seed: int, h: float = 1e-6) -> tuple[float, float]:
    """d f / d params along a random direction (seeded, float64): backprop's value and the central finite difference
    (f(θ + h·d) − f(θ − h·d)) / 2h, the parameters restored to θ after. `f()` returns a scalar float64 tensor; the
    parameters' .grad must be empty before."""
    g = torch.Generator().manual_seed(seed)
    direction = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    f().backward()
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction)).item()
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(h * d)
        up = f().item()
        for p, d in zip(params, direction):
            p.sub_(2 * h * d)
        down = f().item()
        for p, d in zip(params, direction):
            p.add_(h * d)
    return analytic, (up - down) / (2 * h)
