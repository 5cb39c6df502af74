"""PickScore v1: a CLIP-H fine-tuned on Pick-a-Pic preferences; score = logit_scale.exp() * cosine(image, text).

Scoring follows the model card of `yuvalkirstain/PickScore_v1`: the processor of
`laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (its tokenizer with padding, truncation to 77 tokens; its image
preprocessing, replicated here in torch so that gradients reach the pixels), normalised
`get_image_features` / `get_text_features`, `model.logit_scale.exp() * text_embs @ image_embs.T`."""

import torch
import torch.nn.functional as F

from . import _hub
from ._base import Reward, clip_preprocess, hf_clip_image_embeds, model_device_dtype

MODEL_REPO = "yuvalkirstain/PickScore_v1"
PROCESSOR_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# `hf download` arguments for what the loaders read: the CLIP weights, the tokenizer files
MODEL_FILES = ["config.json", "model.safetensors"]
PROCESSOR_FILES = ["--include", "'*.json'", "'*.txt'"]


class PickScoreReward(Reward):
    """`logit_scale.exp() * cos(image, text)`, about 18-23 for SD1.4 samples."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.size = model.vision_model.embeddings.image_size
        self.freeze()

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.check_batch(images, prompts)
        device, dtype = model_device_dtype(self.model)
        pixels = clip_preprocess(images, self.size).to(device, dtype)
        image_embeds = F.normalize(hf_clip_image_embeds(self.model, pixels).float(), dim=-1)
        with torch.no_grad():  # nothing to differentiate on the text side
            tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
            text = self.model.text_model(
                input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
            )
            text_embeds = F.normalize(self.model.text_projection(text.pooler_output).float(), dim=-1)
        return self.model.logit_scale.exp().float() * (image_embeds * text_embeds).sum(-1)

    @classmethod
    def from_pretrained(
        cls, model: str = MODEL_REPO, processor: str = PROCESSOR_REPO, device="cpu", dtype=torch.float32
    ) -> "PickScoreReward":
        """`model` / `processor`: hub ids or local directories (transformers format)."""
        from transformers import AutoTokenizer, CLIPModel

        tokenizer = _hub.pretrained(AutoTokenizer.from_pretrained, processor, PROCESSOR_FILES)
        load = lambda path: CLIPModel.from_pretrained(path, dtype=dtype)  # noqa: E731
        clip = _hub.pretrained(load, model, MODEL_FILES)
        return cls(clip.to(device), tokenizer)
