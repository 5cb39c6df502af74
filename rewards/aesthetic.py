"""LAION aesthetic predictor: an MLP on the normalised CLIP ViT-L/14 image embedding (DDPO's aesthetic reward)."""

import torch

from . import _hub
from ._base import Reward, clip_preprocess, hf_clip_image_embeds, model_device_dtype

CLIP_REPO = "openai/clip-vit-large-patch14"
CLIP_FILES = ["config.json", "model.safetensors"]  # `hf download` arguments for what CLIPModel loads
# A mirror of github.com/christophschuhmann/improved-aesthetic-predictor (the file DDPO ships as well).
HEAD_REPO = "camenduru/improved-aesthetic-predictor"
HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"


class AestheticMLP(torch.nn.Module):
    """The improved-aesthetic-predictor head, 768 -> 1024 -> 128 -> 64 -> 16 -> 1.

    As trained and released: Dropouts between the first layers and no activations (the head is affine in
    eval mode). State-dict keys `layers.0/2/4/6/7.*`."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)

    @classmethod
    def from_file(cls, path: str) -> "AestheticMLP":
        head = cls()
        head.load_state_dict(_hub.torch_load(path), strict=True)
        return head


class AestheticReward(Reward):
    """`MLP(e / |e|)` with `e` the CLIP image embedding; roughly 1-10. Prompts are ignored."""

    def __init__(self, clip, mlp: AestheticMLP):
        super().__init__()
        self.clip, self.mlp = clip, mlp
        self.size = clip.vision_model.embeddings.image_size
        self.freeze()

    def forward(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        device, dtype = model_device_dtype(self.clip)
        pixels = clip_preprocess(images, self.size).to(device, dtype)
        embedding = hf_clip_image_embeds(self.clip, pixels).float()
        embedding = embedding / embedding.norm(dim=-1, keepdim=True)
        head_dtype = next(self.mlp.parameters()).dtype
        return self.mlp(embedding.to(head_dtype)).squeeze(-1).float()

    @classmethod
    def from_pretrained(
        cls, clip: str = CLIP_REPO, head: str | None = None, device="cpu", dtype=torch.float32
    ) -> "AestheticReward":
        """`clip`: hub id or local directory of the transformers CLIP ViT-L/14; `head`: local path of
        `sac+logos+ava1-l14-linearMSE.pth` (default: fetched from the hub)."""
        mlp = _hub.load_file(HEAD_REPO, HEAD_FILE, head, AestheticMLP.from_file)  # the small file first: fail fast
        from transformers import CLIPModel

        load = lambda path: CLIPModel.from_pretrained(path, dtype=dtype)  # noqa: E731
        model = _hub.pretrained(load, clip, CLIP_FILES)
        # The head stays in float32: it is tiny and its input is a unit vector.
        return cls(model.to(device), mlp.to(device))
