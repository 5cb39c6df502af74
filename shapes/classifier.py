"""The judge of `shapes_alignment`: a small CNN with one softmax head per attribute of `shapes.data.ATTRIBUTES`.

Trained by `python -m shapes.train_classifier` on rendered images of every attribute combination (held-out
pairs included: it plays the role of DDPO's vision-language model, which knows more than the generator).
Weights: `shapes/weights/classifier.safetensors` (float32).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from shapes.data import ATTRIBUTES

WEIGHTS_FILE = Path(__file__).parent / "weights" / "classifier.safetensors"
REGENERATE = "python -m shapes.train_classifier"


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1), nn.SiLU(),
        nn.AvgPool2d(2)
    )


class ShapesClassifier(nn.Module):
    """images [B, 3, 32, 32] in [0, 1] -> {attribute: logits [B, number of values]}."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            _block(3, width), _block(width, 2 * width), _block(2 * width, 2 * width), nn.Flatten(),
            nn.Linear(2 * width * 4 * 4, 128), nn.SiLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(values)) for name, values in ATTRIBUTES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(images * 2 - 1)
        return {name: head(h) for name, head in self.heads.items()}

    @classmethod
    def from_file(cls, path: str | Path = WEIGHTS_FILE) -> "ShapesClassifier":
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"shapes classifier weights {path} are missing; "
                                    f"regenerate them with `{REGENERATE}`")
        model = cls()
        model.load_state_dict(load_file(path))
        return model.eval()
