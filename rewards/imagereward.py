"""ImageReward (Xu et al. 2023, ReFL's reward model) on transformers' BLIP classes, from the official checkpoint.

The published package (`image-reward` on PyPI) pins timm==0.6.13 (and fairscale==0.4.13), while this project's
open_clip_torch==3.3.0 needs timm>=1.0.17, so it cannot be installed beside our pins (its 1.0 sdist does not even
build: setup.py imports pkg_resources). The scoring is therefore rewritten here, following the official code
(github.com/THUDM/ImageReward, `ImageReward/ImageReward.py` `ImageReward.score_gard` / `score`, and the BLIP modules
of `ImageReward/models/BLIP/`):

    image_embeds = ViT-L/16 (BLIP `VisionTransformer`, 224 px, 24 blocks, 16 heads, LayerNorm eps 1e-6)(image)
    h = BERT with cross-attention (BLIP `med.py`, `med_config.json`)(prompt tokens; keys/values of the
        cross-attention from image_embeds, all attended)
    reward = (MLP(h[:, 0]) - 0.16717362830052426) / 1.0333394966054072

Tokens: BLIP's `bert-base-uncased` tokenizer, padding to max_length 35 with truncation; the [CLS] token stays first
(ImageReward does not swap in BLIP's [ENC] token). The MLP is the improved-aesthetic-predictor head on 768 features
(`rewards.aesthetic.AestheticMLP`, the same layers and key names `mlp.layers.0/2/4/6/7`). Image transform: the
official `_transform(224)` (Resize(224, bicubic) on PIL, CenterCrop(224), CLIP mean/std) = `clip_preprocess`.

The checkpoint `ImageReward.pt` (hub `THUDM/ImageReward`) is the `state_dict()` of the official `ImageReward` module;
`convert_state_dict` maps its keys onto transformers' `BlipVisionModel` / `BlipTextModel`."""

from __future__ import annotations

import json
import re

import torch

from . import _hub
from ._base import Reward, RewardError, clip_preprocess, model_device_dtype
from .aesthetic import AestheticMLP

REPO = "THUDM/ImageReward"
CHECKPOINT, MED_CONFIG = "ImageReward.pt", "med_config.json"
TOKENIZER_REPO = "google-bert/bert-base-uncased"  # BLIP's `BertTokenizer.from_pretrained('bert-base-uncased')`
TOKENIZER_FILES = ["vocab.txt", "tokenizer_config.json", "tokenizer.json"]
MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.__init__: the score's normalisation
MAX_LENGTH = 35  # ImageReward.score: padding='max_length', truncation=True, max_length=35
VISION_HEADS = 16  # BLIP create_vit('large'): ViT-L/16, 16 heads (not in the checkpoint's shapes)
VISION_EPS = 1e-6  # BLIP VisionTransformer: partial(nn.LayerNorm, eps=1e-6)

# official key (after "blip.visual_encoder.") -> BlipVisionModel key
_VISION_KEYS = [
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.", r"encoder.layers.\1.mlp.\2."),
    (r"norm\.", "post_layernorm."),
]
# in the checkpoint but not used by the score: BLIP's contrastive projections and a constant buffer
_UNUSED = re.compile(r"blip\.(vision_proj|text_proj)\.(weight|bias)|blip\.text_encoder\.embeddings\.position_ids")


def convert_state_dict(official: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The official ImageReward state dict -> {"vision": BlipVisionModel's, "text": BlipTextModel's, "mlp":
    AestheticMLP's}. The text encoder's keys are already transformers' (`BlipTextModel` is a port of BLIP's
    `med.py` with the same module names). Raises RewardError for a key it does not know."""
    parts: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "text": {}, "mlp": {}}
    unknown = []
    for key, value in official.items():
        if _UNUSED.fullmatch(key):
            continue
        if key.startswith("blip.visual_encoder."):
            name = key[len("blip.visual_encoder.") :]
            for pattern, replacement in _VISION_KEYS:
                if re.match(pattern, name):
                    parts["vision"][re.sub(pattern, replacement, name, count=1)] = value
                    break
            else:
                unknown.append(key)
        elif key.startswith("blip.text_encoder."):
            parts["text"][key[len("blip.text_encoder.") :]] = value
        elif key.startswith("mlp.layers."):
            parts["mlp"][key[len("mlp.") :]] = value
        else:
            unknown.append(key)
    if unknown:
        raise RewardError(f"not an ImageReward checkpoint: unexpected keys {unknown[:5]} (of {len(unknown)})")
    return parts


def blip_configs(official: dict[str, torch.Tensor], med_config: dict, vision_heads: int = VISION_HEADS):
    """transformers BlipVisionConfig / BlipTextConfig for the checkpoint: the vision sizes are read from its
    tensors' shapes (BLIP's ViT-L: width 1024, 24 blocks, patch 16, 224 px), the text sizes from med_config.json."""
    from transformers import BlipTextConfig, BlipVisionConfig

    prefix = "blip.visual_encoder."
    width = official[prefix + "cls_token"].shape[-1]
    patch = official[prefix + "patch_embed.proj.weight"].shape[-1]
    grid = round((official[prefix + "pos_embed"].shape[1] - 1) ** 0.5)
    depth = 1 + max(int(m.group(1)) for k in official if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k)))
    vision = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=official[prefix + "blocks.0.mlp.fc1.weight"].shape[0],  # mlp_ratio 4
        num_hidden_layers=depth,
        num_attention_heads=vision_heads,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",  # timm's nn.GELU (exact erf)
        layer_norm_eps=VISION_EPS,
    )
    text = BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        encoder_hidden_size=width,  # BLIP_Pretrain: encoder_config.encoder_width = vision_width
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        pad_token_id=med_config.get("pad_token_id", 0),
        is_decoder=True,  # gives every layer its cross-attention (med.py: add_cross_attention)
    )
    return vision, text


class ImageRewardModel(Reward):
    """`(MLP(BERT(prompt | cross-attention to ViT(image))[CLS]) - mean) / std`; about -2..2 (0 = the mean image
    of ImageReward's training set)."""

    def __init__(self, vision, text, mlp: AestheticMLP, tokenizer):
        super().__init__()
        self.vision, self.text, self.mlp, self.tokenizer = vision, text, mlp, tokenizer
        self.size = vision.config.image_size
        self.freeze()

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.check_batch(images, prompts)
        device, dtype = model_device_dtype(self.vision)
        image_embeds = self.vision(pixel_values=clip_preprocess(images, self.size).to(device, dtype)).last_hidden_state
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        hidden = self.text(
            input_ids=tokens["input_ids"].to(device),
            attention_mask=tokens["attention_mask"].to(device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long, device=device),
        ).last_hidden_state
        head_dtype = next(self.mlp.parameters()).dtype
        score = self.mlp(hidden[:, 0].to(head_dtype)).squeeze(-1).float()
        return (score - MEAN) / STD

    @classmethod
    def from_official(
        cls, official: dict, med_config: dict, tokenizer, vision_heads: int = VISION_HEADS, dtype=torch.float32
    ) -> "ImageRewardModel":
        """Build from the official state dict; every converted key must load (strict)."""
        from transformers import BlipTextModel, BlipVisionModel

        parts = convert_state_dict(official)
        vision_config, text_config = blip_configs(official, med_config, vision_heads)
        vision, text = BlipVisionModel(vision_config), BlipTextModel(text_config, add_pooling_layer=False)
        mlp = AestheticMLP(text_config.hidden_size)
        for module, name in ((vision, "vision"), (text, "text"), (mlp, "mlp")):
            try:
                module.load_state_dict(parts[name], strict=True)
            except RuntimeError as e:  # missing keys or other shapes: a different file than ImageReward.pt
                raise RewardError(f"not an ImageReward checkpoint ({name}): {str(e).splitlines()[1].strip()}") from e
        # The MLP stays in float32 like the aesthetic head (ImageReward.score casts its input to float).
        return cls(vision.to(dtype), text.to(dtype), mlp, tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | None = None,
        med_config: str | None = None,
        tokenizer: str = TOKENIZER_REPO,
        device="cpu",
        dtype=torch.float32,
    ) -> "ImageRewardModel":
        """`checkpoint` / `med_config`: local paths of `ImageReward.pt` / `med_config.json` (default: fetched from
        the hub repo THUDM/ImageReward); `tokenizer`: hub id or directory of BERT's uncased tokenizer."""
        med = _hub.load_file(REPO, MED_CONFIG, med_config, _read_med_config)  # the small files first: fail fast
        from transformers import BertTokenizer

        bert_tokenizer = _hub.pretrained(BertTokenizer.from_pretrained, tokenizer, TOKENIZER_FILES)
        # BLIP's init_tokenizer adds these; they change no ordinary prompt's tokens but keep the vocabulary's size
        bert_tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
        official = _hub.load_file(REPO, CHECKPOINT, checkpoint)
        with _hub.reading(checkpoint, f"copy of {CHECKPOINT} from hub repo '{REPO}'"):  # a dict of other tensors
            reward = cls.from_official(official, med, bert_tokenizer, dtype=dtype)
        return reward.to(device)


MED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings")  # what blip_configs reads from med_config.json


def _read_med_config(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        med = json.load(f)
    missing = [key for key in MED_KEYS if not isinstance(med, dict) or not isinstance(med.get(key), int)]
    if missing:
        raise _hub.Unreadable(f"not BLIP's med_config.json: no integer {', '.join(missing)}")
    return med
