"""Pretrain `tiny-shapes-flow` on a CPU with one thread: the shapes testbed on SD3's layout, trained as a rectified flow.

    python -m shapes.pretrain_flow            # about 40 minutes; writes the diffusers folder shapes/tiny-shapes-flow/

The flow twin of `shapes.pretrain` (`tiny-shapes`), so that the benchmark can put DDIM and flow side by side on the
same task, data and reward:
- the VAE is tiny-shapes' own (same images, same 16×16×4 latents), with SD3's latent convention: `shift_factor` is
  the mean of the latent means on 2048 fresh images and `scaling_factor` 1 / their std, so the transformer sees
  latents (z − shift)·scale of zero mean and unit std, as SD3's 0.0609 / 1.5305 do for its VAE;
- an MMDiT (`SD3Transformer2DModel`, SD3.5's dual attention in its first layer and RMS q/k norm as in `tiny-sd3`) of
  5 layers, width 64 on 2×2 patches (0.76 M parameters; tiny-shapes' UNet has 0.79 M) and two 2-layer CLIP text
  encoders with projections (CLIP-L and CLIP-G's places), trained jointly from scratch; no T5: the folder is SD3
  without its third encoder (`--model NAME:no-t5`'s configuration), so its 256 T5 rows are zeros, as
  `StableDiffusion3Pipeline` makes them;
- SD3's objective (Esser et al. 2024, "Scaling rectified flow transformers", §2-3): x_t = (1 − t)·x0 + t·ε, the
  transformer regresses the velocity ε − x0 at timestep 1000·t, t drawn logit-normal (m = 0, s = 1: their rf/lognorm
  (0.00, 1.00), diffusers' `compute_density_for_timestep_sampling("logit_normal")`), no loss weighting;
- everything else as tiny-shapes: TRAIN_PROMPTS only, 10% caption dropout (the empty prompt, which is what
  StableDiffusion3Pipeline's classifier-free guidance encodes as the negative prompt), Adam with warm-up and cosine
  decay, an EMA of the weights saved, token embeddings initialised with std 1 (shapes.pretrain says why), the
  scheduler `FlowMatchEulerDiscreteScheduler` with SD3's shift 3.0.
Seeded and single-threaded, so a rerun gives the same weights on the same torch build. Figures go to `pretrain.json`.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

from common.models import TINY_SHAPES, TINY_SHAPES_FLOW, sd3_pipeline
from common.sd3 import encode_prompts, predict
from shapes import data
from shapes.pretrain import REPORT, compact, lr_factor

SHIFT = 3.0  # SD3 / SD3.5's FlowMatchEulerDiscreteScheduler shift (their scheduler_config.json)


@dataclass
class Args:
    seed: int = 0
    """seed of the data stream and of the weight initialisation"""
    steps: int = 3000
    """transformer + text encoder optimizer steps (tiny-shapes' UNet had 3000)"""
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    """linear warm-up, then cosine decay to zero"""
    token_embedding_std: float = 1.0
    """initial std of the text encoders' token embeddings (CLIP's own init: 0.02; see shapes.pretrain)"""
    caption_dropout: float = 0.1
    """probability of training on the empty prompt instead of the caption"""
    ema_decay: float = 0.995
    threads: int = 1
    vae_dir: str = str(TINY_SHAPES / "vae")
    """the VAE to reuse: tiny-shapes' (its latent statistics are re-measured here for SD3's shift and scale)"""
    output_dir: str = str(TINY_SHAPES_FLOW)
    """the pipeline folder to write, with pretrain.json (the committed one: shapes/tiny-shapes-flow)"""


def build_modules():
    """The untrained transformer and the two text encoders (widths 32 each, so CLIP-L ⊕ CLIP-G = 64 = the joint
    attention width, and the pooled projections 32 + 32 = 64)."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=5, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=64,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    clips = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
        for _ in range(2)]
    return transformer, clips


def load_vae(vae_dir: str, rng: np.random.Generator, log: dict):
    """tiny-shapes' VAE with SD3's shift and scale measured on 2048 fresh images."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    with torch.no_grad():
        x, _ = data.sample_batch(2048, rng)
        z = torch.cat([vae.encode(c * 2 - 1).latent_dist.mean for c in x.split(256)])
    shift, std = z.mean().item(), z.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
    log["vae"] = dict(source=vae_dir, latent_mean=shift, latent_std=std, shift_factor=shift, scaling_factor=1.0 / std)
    print(log["vae"], flush=True)
    return vae


def train(args: Args, vae, rng: np.random.Generator, log: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(args.seed + 1)
    transformer, clips = build_modules()
    for clip in clips:
        torch.nn.init.normal_(clip.text_model.embeddings.token_embedding.weight, std=args.token_embedding_std)
    # the pipeline object only routes encode_prompts / predict (common/sd3.py) to these modules
    pipe = sd3_pipeline(transformer, vae, (*clips, None), FlowMatchEulerDiscreteScheduler(shift=SHIFT))
    modules = [transformer, *clips]
    for m in modules:
        m.train()
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.Adam(params, lr=args.lr)
    ema = [copy.deepcopy(m).requires_grad_(False).eval() for m in modules]
    train_combos = [a for a in data.all_attrs() if not data.is_heldout(a)]
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    t0, losses = time.time(), []
    for step in range(args.steps):
        images, attrs = data.sample_batch(args.batch_size, rng, train_combos)
        prompts = ["" if rng.random() < args.caption_dropout else data.caption(a) for a in attrs]
        with torch.no_grad():
            x0 = (vae.encode(images * 2 - 1).latent_dist.mean - shift) * scale
        sigma = torch.sigmoid(torch.from_numpy(rng.standard_normal(len(prompts)).astype(np.float32)))
        noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        velocity = predict(pipe, xt, sigma * 1000, encode_prompts(pipe, prompts))
        loss = (velocity - (noise - x0)).pow(2).mean()
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(step, args.warmup_steps, args.steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for ema_module, module in zip(ema, modules):
                for pe, p in zip(ema_module.parameters(), module.parameters()):
                    pe.lerp_(p, 1 - args.ema_decay)
        losses.append(loss.item())
        if step % 100 == 0 or step == args.steps - 1:
            recent = float(np.mean(losses[-100:]))
            print(f"flow {step:5d} loss(last 100) {recent:.4f} {time.time() - t0:.0f}s", flush=True)
    log["transformer"] = dict(
        seconds=round(time.time() - t0, 1),
        parameters=sum(p.numel() for p in transformer.parameters()),
        final_loss_mean_last_100=float(np.mean(losses[-100:])),
        loss_curve_every_100=[round(float(np.mean(losses[i : i + 100])), 4) for i in range(0, len(losses), 100)],
    )
    return sd3_pipeline(ema[0], vae, (*ema[1:], None), FlowMatchEulerDiscreteScheduler(shift=SHIFT))


def save_pipeline(pipe, directory: Path) -> None:
    """Write a `StableDiffusion3Pipeline` folder (text_encoder_3 / tokenizer_3 null): weights in float16 under float32
    configs, the CLIP tokenizers as vocab.json + merges.txt (`shapes.pretrain.compact`)."""
    pipe.save_pretrained(directory)
    compact(Path(directory), ["tokenizer", "tokenizer_2"])


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    log: dict = dict(args=asdict(args))
    t0 = time.time()
    vae = load_vae(args.vae_dir, rng, log)
    pipe = train(args, vae, rng, log)
    log["total_seconds"] = round(time.time() - t0, 1)
    out = Path(args.output_dir)
    save_pipeline(pipe, out)
    log["file_bytes"] = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*"))
                         if p.is_file() and p.name != REPORT}
    (out / REPORT).write_text(json.dumps(log, indent=1) + "\n")
    print(f"the pipeline folder and {REPORT} in {out} ({log['total_seconds']:.0f}s)")


if __name__ == "__main__":
    main(tyro.cli(Args))
