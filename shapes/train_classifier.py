"""Train the shapes classifier (the `shapes_alignment` judge) on a CPU with one thread, a few minutes.

    python -m shapes.train_classifier     # writes shapes/weights/classifier.safetensors and classifier.json

Data: freshly rendered images of all 120 attribute combinations, with augmentations that mimic a generator's
imperfections without changing any attribute (pixel noise, blur, a mild per-channel colour scaling), so that
the judge still reads the attributes of a slightly blurry, off-colour sample. Accuracy per head is measured on
4096 clean fresh images from a separate seed and written to `classifier.json`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from safetensors.torch import save_file

from shapes import data
from shapes.classifier import WEIGHTS_FILE, ShapesClassifier


@dataclass
class Args:
    seed: int = 0
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    eval_images: int = 4096
    threads: int = 1


def augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Noise σ ∈ [0, 0.08], a 3×3 box blur on half the images, colour channels scaled by [0.85, 1.05]."""
    b = images.shape[0]
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    images = torch.where(torch.rand(b, 1, 1, 1, generator=g) < 0.5, blurred, images)
    images = images * (0.85 + 0.2 * torch.rand(b, 3, 1, 1, generator=g))
    images = images + 0.08 * torch.rand(b, 1, 1, 1, generator=g) * torch.randn(images.shape, generator=g)
    return images.clamp(0, 1)


@torch.no_grad()
def accuracy(model: ShapesClassifier, n: int, seed: int) -> dict[str, float]:
    """Per-head accuracy and the all-heads (exact-match) accuracy on n clean fresh images."""
    images, attrs = data.sample_batch(n, np.random.default_rng(seed))
    target = data.labels(attrs)
    logits = {k: torch.cat(v) for k, v in zip(target, zip(*[model(c).values() for c in images.split(512)]))}
    correct = {k: logits[k].argmax(1) == target[k] for k in target}
    return {**{k: v.float().mean().item() for k, v in correct.items()},
            "all": torch.stack(list(correct.values())).all(0).float().mean().item()}


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng, g = np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed)
    model = ShapesClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    t0 = time.time()
    for step in range(args.steps):
        images, attrs = data.sample_batch(args.batch_size, rng)
        logits = model(augment(images, g))
        loss = sum(F.cross_entropy(logits[k], v) for k, v in data.labels(attrs).items())
        for group in optimizer.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"{step:5d} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    model.eval()
    report = dict(args=asdict(args), seconds=round(time.time() - t0, 1),
                  fresh_accuracy=accuracy(model, args.eval_images, seed=10_000 + args.seed))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, WEIGHTS_FILE)
    WEIGHTS_FILE.with_name("classifier.json").write_text(json.dumps(report, indent=1) + "\n")
    print(report)


if __name__ == "__main__":
    main(tyro.cli(Args))
