"""What every reward shares: a frozen module base class and CLIP's image preprocessing written in torch."""

import torch
import torch.nn.functional as F

# OpenAI CLIP's normalisation. It is also what the other two CLIP-H models here were trained with:
# `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`'s preprocessor_config.json / open_clip_config.json (PickScore's
# processor) and open_clip's default for ViT-H-14 laion2b, which HPSv2 builds on.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class RewardError(Exception):
    """A reward cannot be built or used because of the user's input: an unknown name, a malformed spec or option,
    weights absent offline, an unreachable reward server. Scripts print its message as one line, without a
    traceback; any other exception from a reward is a bug."""


class RewardSpecError(RewardError):
    """A malformed reward spec (unknown name, bad weight or option). Deliberately not a ValueError: tyro renders a
    ValueError raised while parsing the command line as its own multi-line box, and the scripts print one line."""


class Reward(torch.nn.Module):
    """`reward(images [B,3,H,W] in [0,1], prompts: list[str]) -> Tensor[B]` (float32).

    `differentiable` says whether gradients reach `images`. Weights are frozen and the module stays in
    eval mode even if a caller runs `.train()` (the aesthetic head has Dropout layers)."""

    differentiable: bool = True

    def freeze(self):
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    @staticmethod
    def check_batch(images: torch.Tensor, prompts) -> None:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")


def clip_preprocess(
    images: torch.Tensor, size: int = 224, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD
) -> torch.Tensor:
    """CLIP's evaluation transform, differentiable with respect to the pixels.

    Resize the shortest side to `size` (bicubic with antialiasing, the kernel PIL uses, so downscaling a
    512x512 sample averages like the official PIL pipelines instead of aliasing), center crop size x size,
    normalise. The output size follows torchvision's `Resize(size)` and transformers' `shortest_edge`: the
    long side is `int(size * long / short)`. The crop offset is `(new - size) // 2` like transformers';
    torchvision rounds half-way offsets instead, which only differs when `new - size` is odd."""
    x = images.float()
    h, w = x.shape[-2:]
    new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0, 1)  # bicubic overshoots; the official pipelines resize uint8 images, which clips
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[..., top : top + size, left : left + size]
    return (x - x.new_tensor(mean).view(-1, 1, 1)) / x.new_tensor(std).view(-1, 1, 1)


def hf_clip_image_embeds(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image embedding of a transformers `CLIPModel` (= `get_image_features`, whose return type
    changed from a tensor to a ModelOutput in transformers 5)."""
    return model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)


def model_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype
