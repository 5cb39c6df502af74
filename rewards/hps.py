"""Human Preference Score v2 / v2.1: cosine similarity of a fine-tuned open_clip ViT-H-14's image and text features.

Scoring follows HPSv2's `hpsv2/img_score.py`: open_clip `ViT-H-14`, `model.load_state_dict(checkpoint
['state_dict'])`, the ViT-H-14 tokenizer, score = image_features . text_features of the normalised features
(no logit scale). The official image transform is open_clip's eval transform (resize 224 bicubic, center
crop, OpenAI mean/std), done here in torch so that gradients reach the pixels."""

import torch
import torch.nn.functional as F

from . import _hub
from ._base import Reward, clip_preprocess, model_device_dtype

REPO = "xswu/HPSv2"
FILES = {"v2": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


class HPSReward(Reward):
    """`cos(image features, text features)`, about 0.2-0.3 for SD1.4 samples."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        size = model.visual.image_size
        self.size = size[0] if isinstance(size, (tuple, list)) else size
        self.freeze()

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.check_batch(images, prompts)
        device, dtype = model_device_dtype(self.model)
        pixels = clip_preprocess(images, self.size).to(device, dtype)
        image_features = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        with torch.no_grad():  # nothing to differentiate on the text side
            text_features = self.model.encode_text(self.tokenizer(list(prompts)).to(device))
        return (image_features * F.normalize(text_features.float(), dim=-1)).sum(-1)

    @classmethod
    def from_pretrained(
        cls, version: str = "v2", checkpoint: str | None = None, device="cpu", dtype=torch.float32, arch="ViT-H-14"
    ) -> "HPSReward":
        """`version` "v2" or "v2.1"; `checkpoint`: local path of the HPS .pt (default: fetched from the hub);
        `arch`: the open_clip model config the checkpoint fits."""
        if version not in FILES:
            raise ValueError(f"unknown HPS version {version!r}; known: {sorted(FILES)}")
        state = _hub.load_file(REPO, FILES[version], checkpoint, _state_dict)  # before building the 1B-parameter model
        import open_clip

        model = open_clip.create_model(arch, pretrained=None)
        with _hub.reading(checkpoint, f"HPS {version} checkpoint ({FILES[version]}) of open_clip's {arch}"):
            model.load_state_dict(state)
        return cls(model.to(device, dtype), open_clip.get_tokenizer(arch))


def _state_dict(path: str) -> dict:
    checkpoint = _hub.torch_load(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise _hub.Unreadable("no 'state_dict' in it, as the released HPS files have")
    return checkpoint["state_dict"]
