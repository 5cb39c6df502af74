"""Pretrain `tiny-shapes` on a CPU with one thread: the VAE first, then the UNet and text encoder jointly.

    python -m shapes.pretrain            # about 50 minutes; writes the diffusers folder shapes/tiny-shapes/

Stage 1 (VAE): reconstruction MSE + a small KL term on freshly rendered images of every attribute combination
(the autoencoder only has to know colours and edges). Its `scaling_factor` is 1 / std of the latent means on
2048 images, so that the diffusion model sees latents of about unit std, as SD1.4's 0.18215 does.
Stage 2 (UNet + text encoder): SD1.4's objective, ε-prediction MSE with t uniform over SD1.4's 1000-step
schedule, on TRAIN_PROMPTS only (the held-out (shape, colour) pairs are never seen); the caption is
replaced by "" with probability `caption_dropout` so that classifier-free guidance has an unconditional
model. An exponential moving average of the UNet and text encoder weights is what gets saved.
Everything is seeded and single-threaded, so a rerun gives the same weights. Figures go to `pretrain.json`.

The model is written as a `StableDiffusionPipeline` folder (`save_pipeline`), so that `from_pretrained(path)` loads
it anywhere and `--model tiny-shapes` is that path: the same classes as SD1.4 and as `common.models.tiny_components`
(UNet2DConditionModel with `tiny`'s layout, so a sampling step costs the same; a smaller AutoencoderKL, 32×32×3
images ↔ 16×16×4 latents; a 2-layer CLIPTextModel), the real CLIP tokenizer, DDIM with SD1.4's schedule. The
weights are stored in float16 (they are small) under float32 configs, so they load as float32.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

from common.models import SD14_SCHEDULER, TINY_SHAPES, clip_bpe, clip_tokenizer, pipeline_components, \
    tiny_text_encoder, tiny_unet, tiny_vae
from shapes import data

REPORT = "pretrain.json"


@dataclass
class Args:
    seed: int = 0
    """seed of the data stream and of the weight initialisation"""
    vae_steps: int = 500
    """VAE optimizer steps"""
    vae_batch_size: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-5
    """weight of the KL term (per latent element) against the pixel MSE"""
    unet_steps: int = 3000
    """UNet + text encoder optimizer steps"""
    unet_batch_size: int = 32
    unet_lr: float = 1e-3
    warmup_steps: int = 100
    """linear warm-up, then cosine decay to zero"""
    token_embedding_std: float = 1.0
    """initial std of the text encoder's token embeddings (CLIP's own init: 0.02; see train_unet)"""
    caption_dropout: float = 0.1
    """probability of training on the empty prompt instead of the caption"""
    ema_decay: float = 0.995
    threads: int = 1
    output_dir: str = str(TINY_SHAPES)
    """the pipeline folder to write, with pretrain.json (the committed one: shapes/tiny-shapes)"""


def build_vae(scaling_factor: float = 1.0):
    """`tiny`'s VAE layout at half the channels: the shapes need less capacity."""
    return tiny_vae(channels=(16, 32), norm_groups=8, scaling_factor=scaling_factor)


def save_pipeline(unet, vae, text_encoder, directory: Path) -> None:
    """Write the model as a `StableDiffusionPipeline` folder: model_index.json, unet/, vae/, text_encoder/,
    tokenizer/, scheduler/. Configs say float32 and the weights are float16 (exact: the float32 values loaded back
    are these float16 numbers). The tokenizer is SD1.4's format, vocab.json + merges.txt (1.5 MB; transformers'
    own tokenizer.json would be 3.6 MB)."""
    from diffusers import StableDiffusionPipeline

    directory = Path(directory)
    pipe = StableDiffusionPipeline(**pipeline_components(unet, vae, text_encoder), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(directory)
    compact(directory, ["tokenizer"])


def compact(directory: Path, tokenizers: list[str]) -> None:
    """A saved pipeline folder made small: its weight files rewritten in float16, its CLIP tokenizers' tokenizer.json
    (3.6 MB) replaced by SD1.4's vocab.json + merges.txt (1.5 MB), which load as the same tokenizer."""
    from safetensors.torch import load_file, save_file

    for path in directory.glob("*/*.safetensors"):
        save_file({k: v.to(torch.float16) for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    vocab, merges = clip_bpe()
    for name in tokenizers:
        (directory / name / "tokenizer.json").unlink()
        (directory / name / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)},
                                                                ensure_ascii=False))
        (directory / name / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def lr_factor(step: int, warmup_steps: int, steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to zero at `steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (steps - warmup_steps)))


def train_vae(args: Args, rng: np.random.Generator, log: dict):
    torch.manual_seed(args.seed)
    vae = build_vae()
    optimizer = torch.optim.Adam(vae.parameters(), lr=args.vae_lr)
    t0 = time.time()
    for step in range(args.vae_steps):
        x = data.sample_batch(args.vae_batch_size, rng)[0] * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = (recon - x).pow(2).mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + args.kl_weight * kl
        for group in optimizer.param_groups:
            group["lr"] = args.vae_lr * 0.5 * (1 + math.cos(math.pi * step / args.vae_steps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.vae_steps - 1:
            print(f"vae {step:5d} mse {mse.item():.5f} kl {kl.item():.3f} {time.time() - t0:.0f}s", flush=True)
    vae.eval()
    with torch.no_grad():
        x, _ = data.sample_batch(2048, rng)
        latents = torch.cat([vae.encode(c * 2 - 1).latent_dist.mean for c in x.split(256)])
        recon = torch.cat([vae.decode(z).sample for z in latents.split(256)])
        heldout_mse = ((recon.clamp(-1, 1) / 2 + 0.5) - x).pow(2).mean().item()
    vae.register_to_config(scaling_factor=1.0 / latents.std().item())
    log["vae"] = dict(
        seconds=round(time.time() - t0, 1),
        final_train_mse=mse.item(),
        fresh_image_mse_01=heldout_mse,  # MSE in [0, 1] pixel units on 2048 fresh images
        latent_std=latents.std().item(),
        latent_mean=latents.mean().item(),
        scaling_factor=vae.config.scaling_factor,
    )
    print(log["vae"], flush=True)
    return vae


def train_unet(args: Args, vae, rng: np.random.Generator, log: dict):
    from diffusers import DDIMScheduler

    torch.manual_seed(args.seed + 1)
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    # CLIP initialises token embeddings with std 0.02, as small as the position embeddings: the 2-layer encoder's
    # outputs then barely differ between prompts and the UNet learned to ignore them (measured after 400 steps:
    # shuffling the captions raised the loss by 0.1%). With std 1 the words dominate (2-3% after 400 steps).
    torch.nn.init.normal_(text_encoder.embeddings.token_embedding.weight, std=args.token_embedding_std)
    tokenizer = clip_tokenizer()
    alphas = DDIMScheduler(**SD14_SCHEDULER).alphas_cumprod
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.Adam(params, lr=args.unet_lr)
    ema = [copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)]
    train_combos = [a for a in data.all_attrs() if not data.is_heldout(a)]
    t0, losses = time.time(), []
    for step in range(args.unet_steps):
        images, attrs = data.sample_batch(args.unet_batch_size, rng, train_combos)
        prompts = ["" if rng.random() < args.caption_dropout else data.caption(a) for a in attrs]
        with torch.no_grad():
            x0 = vae.encode(images * 2 - 1).latent_dist.mean * vae.config.scaling_factor
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        t = torch.from_numpy(rng.integers(0, SD14_SCHEDULER["num_train_timesteps"], size=len(prompts)))
        noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
        abar = alphas[t].view(-1, 1, 1, 1)
        xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        eps = unet(xt, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = (eps - noise).pow(2).mean()
        for group in optimizer.param_groups:
            group["lr"] = args.unet_lr * lr_factor(step, args.warmup_steps, args.unet_steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for ema_module, module in zip(ema, (unet, text_encoder)):
                for pe, p in zip(ema_module.parameters(), module.parameters()):
                    pe.lerp_(p, 1 - args.ema_decay)
        losses.append(loss.item())
        if step % 100 == 0 or step == args.unet_steps - 1:
            recent = float(np.mean(losses[-100:]))
            print(f"unet {step:5d} loss(last 100) {recent:.4f} {time.time() - t0:.0f}s", flush=True)
    log["unet"] = dict(
        seconds=round(time.time() - t0, 1),
        final_loss_mean_last_100=float(np.mean(losses[-100:])),
        loss_curve_every_100=[round(float(np.mean(losses[i : i + 100])), 4) for i in range(0, len(losses), 100)],
    )
    return ema


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    log: dict = dict(args=asdict(args))
    t0 = time.time()
    vae = train_vae(args, rng, log)
    unet, text_encoder = train_unet(args, vae, rng, log)
    log["total_seconds"] = round(time.time() - t0, 1)
    out = Path(args.output_dir)
    save_pipeline(unet, vae, text_encoder, out)
    log["file_bytes"] = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*"))
                         if p.is_file() and p.name != REPORT}
    (out / REPORT).write_text(json.dumps(log, indent=1) + "\n")
    print(f"the pipeline folder and {REPORT} in {out} ({log['total_seconds']:.0f}s)")


if __name__ == "__main__":
    main(tyro.cli(Args))
