"""ImageNet ResNet-50 target-class reward: DRaFT §5.3's adversarial examples.

Reward = -cross-entropy(logits, target) = log softmax(logits)[target]: fine-tuning on it makes the images of one
class (the prompts name it, e.g. "a photo of a mouse") be classified as another (the target, e.g. a cat), the
example issue 13 gives.

Weights: transformers `microsoft/resnet-50` (`ResNetForImageClassification`, ResNet-50 v1.5 trained on ImageNet-1k),
as issue 13 chose it: the DRaFT paper's text was not at hand here to say which ResNet-50 it used. Its processor
(`preprocessor_config.json`: `ConvNextImageProcessor`, size 224, crop_pct 0.875, resample 3, ImageNet mean/std)
resizes the shortest side to int(224 / 0.875) = 256 (bicubic), center-crops 224 and normalises; that is done here
in torch so that gradients reach the pixels. Class names are
the model config's `id2label` (ImageNet's synonym lists, e.g. 281 "tabby, tabby cat")."""

from __future__ import annotations

import difflib

import torch

from . import _hub
from ._base import Reward, RewardSpecError, clip_preprocess, model_device_dtype

MODEL_REPO = "microsoft/resnet-50"
MODEL_FILES = ["config.json", "model.safetensors"]  # `hf download` arguments for what the loader reads
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP, RESIZE = 224, int(224 / 0.875)  # 256
TARGET = "tabby cat"  # ImageNet 281; issue 13's example target is "cat"


def resnet_preprocess(images: torch.Tensor) -> torch.Tensor:
    """ConvNextImageProcessor with crop_pct 0.875: shortest side to 256, center crop 224, ImageNet mean/std.

    The 256 resize and its central 256 x 256 crop are `clip_preprocess` without normalisation; the central 224 of
    that crop is the central 224 of the resized image (the margins differ by 32, an even number)."""
    x = clip_preprocess(images, RESIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    top = (RESIZE - CROP) // 2
    x = x[..., top : top + CROP, top : top + CROP]
    return (x - x.new_tensor(IMAGENET_MEAN).view(-1, 1, 1)) / x.new_tensor(IMAGENET_STD).view(-1, 1, 1)


def class_index(target: str | int, id2label: dict) -> int:
    """ImageNet class index of `target`: an index ("281" or 281) or a class name, matched case-insensitively
    against the whole label or any of its comma-separated synonyms ("tabby cat" or "tabby, tabby cat").

    Raises RewardSpecError for an index out of range, an unknown name (listing close matches) or a name that
    several classes share (listing them)."""
    labels = {int(i): str(label) for i, label in id2label.items()}
    text = str(target).strip()
    if text.lstrip("-").isdigit():
        if int(text) not in labels:
            raise RewardSpecError(f"target class index {text} is out of range 0..{len(labels) - 1}")
        return int(text)
    names: dict[str, set[int]] = {}
    for i, label in labels.items():
        for name in {label, *label.split(",")}:
            names.setdefault(name.strip().lower(), set()).add(i)
    found = names.get(text.lower(), set())
    if len(found) == 1:
        return found.pop()
    if found:
        listed = "; ".join(f"{i} ({labels[i]})" for i in sorted(found))
        raise RewardSpecError(f"target class {text!r} names several ImageNet classes: {listed}; give the index")
    close = difflib.get_close_matches(text.lower(), names, n=5, cutoff=0.6)
    hint = "; ".join(f"{name!r} ({', '.join(map(str, sorted(names[name])))})" for name in close)
    raise RewardSpecError(
        f"unknown target class {text!r}" + (f"; close matches: {hint}" if hint else "")
        + "; give a class name of the model's id2label or an index 0..999"
    )


class ResNetTarget(Reward):
    """`log softmax(ResNet-50 logits)[target]` = -cross-entropy to the target class, <= 0. Prompts are ignored."""

    def __init__(self, model, target: int):
        super().__init__()
        self.model, self.target = model, target
        self.freeze()

    def forward(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        device, dtype = model_device_dtype(self.model)
        logits = self.model(pixel_values=resnet_preprocess(images).to(device, dtype)).logits.float()
        return torch.log_softmax(logits, dim=-1)[:, self.target]

    def extra_repr(self) -> str:
        return f"target={self.target} ({self.model.config.id2label[self.target]})"

    @classmethod
    def from_pretrained(
        cls, model: str = MODEL_REPO, target: str | int = TARGET, device="cpu", dtype=torch.float32
    ) -> "ResNetTarget":
        """`model`: hub id or local directory (transformers format); `target`: ImageNet class name or index."""
        from transformers import AutoConfig, ResNetForImageClassification

        def resnet_config(path):  # another model's labels would make any class name "unknown"
            config = AutoConfig.from_pretrained(path)
            if config.model_type != "resnet":
                raise _hub.Unreadable(f"its config.json describes a {config.model_type!r} model, not a ResNet")
            return config

        # the class name is checked against the config's labels before the weights load
        config = _hub.pretrained(resnet_config, model, MODEL_FILES)
        index = class_index(target, config.id2label)
        load = lambda path: ResNetForImageClassification.from_pretrained(path, dtype=dtype)  # noqa: E731
        return cls(_hub.pretrained(load, model, MODEL_FILES).to(device), index)
