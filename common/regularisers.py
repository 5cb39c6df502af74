"""What holds a run near the base model, for any family: the per-step KL to the base model (GRPO's, DDPO's with
--kl-beta), an exponential moving average of the LoRA weights (--ema-decay), and the denoising loss on image–caption
data (ReFL's pre-training loss, --pretrain-data)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from .distributed import randint, randn
from .diffusion import add_noise, denoiser, denoising_target, encode, family, guided_noise_pred, step_mean_std
from .errors import UserError

EMA_FILE = "lora_ema.safetensors"
"""The EMA of the LoRA, in diffusers' format, beside the run's LoRA: `pipe.load_lora_weights(run_dir,
weight_name="lora_ema.safetensors")`. Its name must not end in `pytorch_lora_weights.safetensors`: diffusers'
`load_lora_weights(folder)` picks the one file that does."""


# --- the KL to the base model ------------------------------------------------------------------------------------

@contextlib.contextmanager
def base_model(pipe):
    """The denoiser with its LoRA disabled (diffusers' disable_adapters): the base model, without a second copy in
    memory. The LoRA is enabled again on leaving, also after an exception."""
    net = denoiser(pipe)
    net.disable_adapters()
    try:
        yield
    finally:
        net.enable_adapters()


def kl_to_base(pipe, latents, t, cond, uncond, noise_pred, guidance_scale: float, eta: float) -> torch.Tensor:
    """KL(p_θ ‖ p_ref) of one stochastic sampler step x_t → x_{t−1}: both are Gaussians with the same σ_t, so the KL
    is ‖μ_θ − μ_ref‖² / (2σ_t²), averaged over C,H,W like the log-prob and over the batch (Flow-GRPO's kl_loss,
    scripts/train_sd3.py). `noise_pred` is the LoRA model's guided prediction at (latents, t), with its graph; μ_ref
    comes from the same denoiser with its LoRA disabled: one more forward, without gradient."""
    with base_model(pipe), torch.no_grad():
        noise_pred_ref = guided_noise_pred(pipe, latents, t, cond, uncond, guidance_scale)
    mean, std = step_mean_std(pipe.scheduler, noise_pred, t, latents, eta)
    mean_ref, _ = step_mean_std(pipe.scheduler, noise_pred_ref, t, latents, eta)
    return ((mean - mean_ref) ** 2 / (2 * std**2)).mean()


def prediction_gap(pipe, latents, t, cond, uncond, noise_pred, guidance_scale: float) -> torch.Tensor:
    """mean ‖ε̂_θ − ε̂_ref‖² over C,H,W and the batch: the guided predictions of the LoRA model (`noise_pred`, with its
    graph) and of the base model at the same (latents, t). DPOK's bound of the KL between the two models' sample
    distributions is a weighted sum of this term over the steps (Fan et al., "DPOK", NeurIPS 2023, Lemma 4.2): for
    the deterministic samplers of the gradient scripts, which have no per-step Gaussian, it stands for the KL."""
    with base_model(pipe), torch.no_grad():
        noise_pred_ref = guided_noise_pred(pipe, latents, t, cond, uncond, guidance_scale)
    return ((noise_pred - noise_pred_ref) ** 2).mean()


# --- the EMA of the LoRA weights ---------------------------------------------------------------------------------

class LoraEMA:
    """θ_ema ← d_n·θ_ema + (1 − d_n)·θ after each applied optimizer update, d_n = min(decay, (1 + n)/(10 + n)) for
    the n-th update (n = 0, 1, …): flow_grpo's EMAModuleWrapper (flow_grpo/ema.py), whose warm-up lets the average
    follow the first updates instead of holding at the initial LoRA. decay 0 turns it off: nothing is stored, and
    `applied()` leaves the weights as they are.

        ema = common.LoraEMA(params, args.ema_decay)
        optimizer.step(); ema.update()
        with ema.applied():          # the sample grid, the saved EMA LoRA
            grid(pipe)
    """

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay, self.updates = list(params), decay, 0
        self.shadow = [p.detach().clone() for p in self.params] if decay > 0 else []

    @torch.no_grad()
    def update(self) -> None:
        if not self.shadow:
            return
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach(), alpha=1 - d)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self):
        """The LoRA parameters hold the EMA inside the block; the trained weights come back exactly on leaving."""
        if not self.shadow:
            yield
            return
        trained = [p.data for p in self.params]
        for p, s in zip(self.params, self.shadow):
            p.data = s.clone()  # a copy: nothing done inside the block touches the average
        try:
            yield
        finally:
            for p, w in zip(self.params, trained):
                p.data = w

    def state_dict(self) -> dict:
        return dict(updates=self.updates, shadow=[s.clone() for s in self.shadow]) if self.shadow else {}

    def load_state_dict(self, state: dict) -> None:
        if self.shadow and state:
            self.updates = state["updates"]
            for s, saved in zip(self.shadow, state["shadow"], strict=True):
                s.copy_(saved)


# --- the denoising loss on image–caption data (ReFL's pre-training loss) ------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_image_captions(folder: str | Path) -> list[tuple[Path, str]]:
    """(image, caption) pairs of a folder in one of the two layouts people already have: `metadata.jsonl` with
    `file_name` and `text` per line (diffusers' imagefolder, as its train_text_to_image example reads), else every
    image with a caption file of the same name (`cat.png` + `cat.txt`, kohya's and DreamBooth's layout). Anything
    missing or empty raises UserError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--pretrain-data {folder}: no such folder")
    metadata = folder / "metadata.jsonl"
    pairs = []
    if metadata.is_file():
        for n, line in enumerate(metadata.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append((folder / row["file_name"], str(row["text"])))
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{metadata}:{n}: expected a JSON object with file_name and text ({e})") from None
        missing = [p for p, _ in pairs if not p.is_file()]
        if missing:
            raise UserError(f"{metadata} names {missing[0]}, which does not exist")
    else:
        for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            text = image.with_suffix(".txt")
            if not text.is_file():
                raise UserError(f"--pretrain-data {folder}: {image.name} has no caption file {text.name} (or give a "
                                "metadata.jsonl with file_name and text)")
            pairs.append((image, text.read_text().strip()))
    if not pairs:
        raise UserError(f"--pretrain-data {folder} holds no images with captions (image files with same-name .txt "
                        "captions, or a metadata.jsonl with file_name and text)")
    return pairs


class PretrainData:
    """The image–caption pairs of a folder (`load_image_captions`), resized (shorter side) and centre-cropped to the
    model's image size, in [0, 1], held in memory: a regularising set of a few thousand images at most."""

    def __init__(self, folder: str | Path, pipe):
        import numpy as np
        from PIL import Image

        net = denoiser(pipe)
        side = net.config.sample_size * pipe.vae_scale_factor
        self.captions, images = [], []
        for path, text in load_image_captions(folder):
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB")
            except OSError as e:
                raise UserError(f"--pretrain-data: {path} is not a readable image ({e})") from None
            scale = side / min(im.size)
            im = im.resize((max(side, round(im.width * scale)), max(side, round(im.height * scale))),
                           Image.BICUBIC)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side))
            images.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
            self.captions.append(text)
        self.images = torch.stack(images)

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, n: int, rng) -> tuple[torch.Tensor, list[str]]:
        """n pairs drawn uniformly with replacement by the run's `random.Random` (checkpointed: a resume draws the
        same): (images [n, 3, H, W], captions)."""
        idx = [rng.randrange(len(self)) for _ in range(n)]
        return self.images[idx], [self.captions[i] for i in idx]


def denoising_loss(pipe, images: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The latent diffusion model's training loss on images [B, 3, H, W] in [0, 1] with their conditioning [B, L, D]
    (diffusers' train_text_to_image.py): x0 drawn from the VAE posterior, t uniform over the training timesteps,
    x_t = add_noise(x0, ε, t), L = mean ‖denoiser(x_t, t, c) − target‖² with the family's target (ε or v). Draws z,
    ε and t from torch's global generator (saved in checkpoints: a resumed run draws the same), in that order."""
    mean, std = encode(pipe, images)
    x0 = mean + std * randn(mean.shape, None, mean.device)  # under torchrun: the global batch's draws, sharded
    noise = randn(x0.shape, None, x0.device)
    t = randint(pipe.scheduler.config.num_train_timesteps, len(x0), x0.device)
    x_t = add_noise(pipe.scheduler, x0, noise, t)
    dtype = next(denoiser(pipe).parameters()).dtype
    pred = family(pipe).predict(pipe, x_t.to(dtype), t, cond.to(dtype))
    return torch.nn.functional.mse_loss(pred.float(), denoising_target(pipe.scheduler, x0, noise, t).float())
