"""The gradient scripts' differentiable decode at SDXL's 1024 px on the CPU: seconds and peak memory of one image's
`common.decode` forward + backward through SDXL-base's VAE decoder (architecture from common/configs/sdxl/vae, random
weights), with and without gradient checkpointing of the decoder (`--vae-checkpointing`), in float32 and bf16.

Issue 23, item 5: what DRaFT, DRaFT-LV, ReFL and AlignProp add at the end of their chain for an SDXL image with
micro-batches of one (`--train-batch-size 1`). The UNet's part is in bench_sd14.py (`--model sdxl-random`); a whole
update at 1024 px is out of a CPU's reach. The reward is a stand-in with the shape of every image reward here: the
image resized to 224 px (what the CLIP-based rewards read) and a differentiable scalar of it, so the gradient reaches
the latents through the decoder as a reward's would; a real reward model adds its own weights and activations at 224.

Each variant runs in a fresh subprocess, so its peak resident set size (getrusage ru_maxrss) is its own.

    python benchmark/bench_vae_decode.py                 # 1024 px, float32 and bf16, both checkpointing settings
    python benchmark/bench_vae_decode.py --resolution 512 --dtypes float32
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(resolution: int, dtype_name: str, checkpointing: bool) -> dict:
    import torch
    import torch.nn.functional as F
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    import common
    from common.models import SDXL_CONFIGS, random_weights_

    dtype = getattr(torch, dtype_name)
    pipe = common.load_pipeline("tiny-sdxl", lora_rank=0)  # the SDXL family; its VAE replaced by SDXL-base's
    with init_empty_weights(include_buffers=False):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SDXL_CONFIGS / "vae"))
    vae = random_weights_(vae, seed=1, dtype=dtype).requires_grad_(False).eval()
    if checkpointing:
        vae.enable_gradient_checkpointing()
    pipe.register_modules(vae=vae)
    pipe.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)  # 8, as StableDiffusionXLPipeline computes
    side = resolution // pipe.vae_scale_factor
    latents = torch.randn(1, vae.config.latent_channels, side, side, requires_grad=True)
    start = time.perf_counter()
    images = common.decode(pipe, latents)  # [1, 3, resolution, resolution] in [0, 1], float32
    reward = F.interpolate(images, size=(224, 224), mode="bilinear", antialias=True).square().mean()
    reward.backward()
    seconds = time.perf_counter() - start
    assert images.shape[-1] == resolution and torch.isfinite(latents.grad).all()
    return dict(resolution=resolution, dtype=dtype_name, vae_checkpointing=checkpointing, seconds=round(seconds, 1),
                peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes (%(default)s)")
    parser.add_argument("--child", nargs=3, metavar=("RESOLUTION", "DTYPE", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.child[2] == "1")))
        return
    print("| resolution | dtype | VAE checkpointing | s forward + backward | peak RSS (GB) |\n|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        for ckpt in (False, True):
            out = subprocess.run([sys.executable, __file__, "--child", str(args.resolution), dtype, str(int(ckpt))],
                                 capture_output=True, text=True)
            if out.returncode:  # killed for memory (no output) or failed
                why = (out.stderr.strip().splitlines() or [f"killed by signal {-out.returncode}" if out.returncode < 0
                                                           else f"exit code {out.returncode}"])[-1]
                print(f"| {args.resolution} | {dtype} | {'yes' if ckpt else 'no'} | failed: {why} | |", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {r['resolution']} | {r['dtype']} | {'yes' if ckpt else 'no'} | {r['seconds']} | "
                  f"{r['peak_rss_gb']} |", flush=True)


if __name__ == "__main__":
    main()
