"""The papers' own rewards: OWL-ViT detection / removal / counting (DRaFT §5.3, AlignProp), the
ImageNet ResNet-50 target class (DRaFT §5.3) and ImageReward (ReFL), each on its real architecture built tiny from
config with random weights, checked against the official processors and post-processing, or (ImageReward) against
a forward pass written here directly from the official checkpoint's tensors. CPU only, no network."""

import json

import pytest
import torch
import torch.nn.functional as F
from test_rewards import (  # noqa: F401  (fixtures: pytest finds them by name in this module)
    DETAILED,
    SIZES,
    affine_gain,
    as_batch,
    hf_tokenizer,
    offline_empty_cache,
    same_input_tolerance,
    smooth_uint8,
    to_pil,
)

import rewards
from conftest import pair_tolerance, rounding_tolerance, roundings
from rewards import RewardError, RewardSpecError, WeightsNotFound
from rewards._base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from rewards.imagereward import STD, ImageRewardModel, convert_state_dict
from rewards.owlvit import (
    OwlViTCount,
    OwlViTCountExact,
    OwlViTDetection,
    count_query,
    owlvit_preprocess,
    parse_count,
    parse_options,
)
from rewards.resnet import ResNetTarget, class_index, resnet_preprocess

PROMPTS = ["three apples on a table", "a dog in the snow"]
OWL_SIZE = 384  # the tiny detector's input (144 boxes); the real base-patch32 reads 768 (tested on the transform)


# ---------------------------------------------------------------------------------------------- OWL-ViT
def owlvit_processor(size: int):
    """`google/owlvit-base-patch32`'s preprocessor_config.json (size 768, crop 768, resample 3 = bicubic, CLIP
    mean/std) at `size`, with transformers' PIL backend (the pipeline of transformers 4, OWL-ViT's model card)."""
    from transformers.models.owlvit.image_processing_pil_owlvit import OwlViTImageProcessorPil

    return OwlViTImageProcessorPil(
        do_resize=True, size=size, resample=3, do_center_crop=True, crop_size=size, do_normalize=True,
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
    )


@pytest.fixture(scope="module")
def owlvit(hf_tokenizer):
    """OwlViTForObjectDetection with CLIP's vocabulary and patch 32, everything else tiny. The class and box heads
    are re-drawn small (random init saturates their sigmoids) with a negative logit shift, so that some boxes fall
    below the 0.1 threshold and some above, and gradients do not vanish."""
    from transformers import OwlViTConfig, OwlViTForObjectDetection

    torch.manual_seed(0)
    config = OwlViTConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(image_size=OWL_SIZE, patch_size=32, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=32,
    )
    model = OwlViTForObjectDetection(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("class_head", "box_head")):
                p.normal_(0, 0.1) if p.ndim > 1 else p.zero_()
        model.class_head.logit_shift.bias.fill_(-2.0)
    hf_tokenizer.model_max_length = 16  # owlvit-base-patch32's tokenizer_config.json
    return model, hf_tokenizer


def official_detections(model, tokenizer, images_uint8, queries: list[list[str]]) -> list[dict]:
    """OWL-ViT's model card: OwlViTProcessor(text=queries, images) -> model -> post_process_object_detection(0.1)."""
    from transformers import OwlViTProcessor

    processor = OwlViTProcessor(image_processor=owlvit_processor(OWL_SIZE), tokenizer=tokenizer)
    inputs = processor(text=queries, images=[to_pil(i) for i in images_uint8], return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    return processor.image_processor.post_process_object_detection(outputs, threshold=0.1)


@pytest.mark.parametrize("h, w", SIZES)
def test_owlvit_preprocess_matches_processor(h, w):
    images = [smooth_uint8(h, w, seed=s, **DETAILED) for s in (1, 2)]
    expected = owlvit_processor(768)(images=[to_pil(i) for i in images], return_tensors="pt")["pixel_values"]
    pixels = owlvit_preprocess(as_batch(images), 768)
    assert pixels.shape == expected.shape == (2, 3, 768, 768)
    # The reference rounds its resized image to uint8 (mean |diff| 0.0036 in normalised units from that alone);
    # measured max / mean 0.045 / 0.0046. Torch's default bicubic (a = -0.75) measures 0.075 / 0.011, bilinear 0.11
    # / 0.018.
    difference = (pixels - expected).abs()
    assert difference.max() < 0.06 and difference.mean() < 0.006


def test_owlvit_detect_and_remove_match_official_postprocessing(owlvit):
    model, tokenizer = owlvit
    images = [smooth_uint8(OWL_SIZE, OWL_SIZE, seed=s) for s in (3, 4)]  # input size: no resize, exact pixels
    queries = ["a photo of a person", "a photo of a face"]
    detect = OwlViTDetection(model, tokenizer, sign=1.0, queries=queries)
    scores = detect(as_batch(images), PROMPTS)

    # DRaFT §5.3's reward from the post-processed detections: sum of (score + box area), boxes in xyxy
    expected = []
    for result in official_detections(model, tokenizer, images, [queries, queries]):
        x0, y0, x1, y1 = result["boxes"].unbind(-1)
        expected.append((result["scores"] + (x1 - x0) * (y1 - y0)).sum())
        assert 0 < len(result["scores"]) < OWL_SIZE**2 // 32**2  # the threshold selects some boxes, not all
    assert scores.shape == (2,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    torch.testing.assert_close(scores, torch.stack(expected), rtol=1e-5, atol=1e-5)

    remove = OwlViTDetection(model, tokenizer, sign=-1.0, queries=queries)
    torch.testing.assert_close(remove(as_batch(images), PROMPTS), -scores)


def test_owlvit_default_queries(owlvit):
    model, tokenizer = owlvit
    images = as_batch([smooth_uint8(64, 64, seed=s) for s in (5, 6)])
    # detect: each image's own prompt is its query
    detect = OwlViTDetection(model, tokenizer, **OwlViTDetection.options(sign=1.0))
    one_by_one = [OwlViTDetection(model, tokenizer, 1.0, [p])(images[i : i + 1], [p]) for i, p in enumerate(PROMPTS)]
    torch.testing.assert_close(detect(images, PROMPTS), torch.cat(one_by_one))
    # remove: people, whatever the prompt
    remove = OwlViTDetection(model, tokenizer, **OwlViTDetection.options(sign=-1.0))
    people = OwlViTDetection(model, tokenizer, -1.0, ["a photo of a person"])
    torch.testing.assert_close(remove(images, PROMPTS), people(images, ["anything", "else"]))


def test_owlvit_options():
    assert parse_options("a person| a face ", None) == (["a person", "a face"], 0.1)
    assert parse_options(None, "0.3") == (None, 0.3)
    assert OwlViTDetection.options(sign=-1.0, queries="a cat", threshold="0") == {
        "sign": -1.0, "queries": ["a cat"], "threshold": 0.0
    }
    for queries, threshold in (("a||b", None), ("", None), (None, "high"), (None, "1.5"), (None, "-0.1")):
        with pytest.raises(RewardSpecError):
            parse_options(queries, threshold)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("three apples", (3, "apple")),
        ("3 apples", (3, "apple")),
        ("Five red apples on a table", (5, "red apple")),
        ("a dog", (1, "dog")),
        ("an orange", (1, "orange")),
        ("a photo of two cats and a dog", (2, "cat")),
        ("an image of a horse riding a bike", (1, "horse")),
        ("ten puppies", (10, "puppy")),
        ("four boxes, stacked", (4, "box")),
        ("two glasses of water", (2, "glass")),
        ("six mice", (6, "mouse")),
        ("two people walking", (2, "person")),
        ("7 tomatoes", (7, "tomato")),
        ("one bus", (1, "bus")),
        ("apples on a table", None),
        ("the moon", None),
        ("", None),
    ],
)
def test_count_parser(prompt, expected):
    assert parse_count(prompt) == expected


def test_paper_prompt_sets():
    import common

    counts = [parse_count(p) for p in common.load_prompts("counting")]
    assert len(counts) == 60 and all(c is not None for c in counts)
    assert sorted(n for n, _ in counts) == sorted(list(range(1, 6)) * 12)  # each number once per object
    assert len({obj for _, obj in counts}) == 12
    assert all("mouse" in p for p in common.load_prompts("imagenet_mouse"))
    assert "a bowl of fruit" in common.load_prompts("draft_detection")
    assert len(common.load_prompts("draft_removal")) >= 8


def test_owlvit_count_matches_official_postprocessing(owlvit):
    model, tokenizer = owlvit
    images = [smooth_uint8(OWL_SIZE, OWL_SIZE, seed=s) for s in (7, 8, 9)]
    prompts = PROMPTS + ["apples on a table"]  # the last names no count
    soft = OwlViTCount(model, tokenizer)(as_batch(images), prompts)
    exact = OwlViTCountExact(model, tokenizer)(as_batch(images), prompts)

    assert count_query("apple") == "a photo of an apple" and count_query("dog") == "a photo of a dog"
    results = official_detections(model, tokenizer, images[:2], [["a photo of an apple"], ["a photo of a dog"]])
    expected_soft = [-(r["scores"].sum() - n) ** 2 for r, n in zip(results, (3, 1))]
    torch.testing.assert_close(soft, torch.stack(expected_soft + [torch.tensor(0.0)]), rtol=1e-5, atol=1e-5)
    detections = [len(r["scores"]) for r in results]
    assert exact.tolist() == [float(detections[0] == 3), float(detections[1] == 1), 0.0]
    assert OwlViTCountExact.differentiable is False and not exact.requires_grad


# ---------------------------------------------------------------------------------------------- ResNet-50
def imagenet_id2label() -> dict[int, str]:
    """ImageNet's 1000 class names (torchvision's list, shipped in its package) with the labels of microsoft/
    resnet-50's config.json, comma-separated synonym lists, where these tests use them."""
    import torchvision

    labels = dict(enumerate(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"]))
    labels.update({134: "crane", 517: "crane", 281: "tabby, tabby cat", 673: "mouse, computer mouse"})
    return labels


@pytest.fixture(scope="module")
def resnet():
    """ResNetForImageClassification (bottleneck blocks, as ResNet-50) with ImageNet's 1000 labels, tiny widths."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    labels = imagenet_id2label()
    config = ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck",
                          id2label=labels, label2id={v: k for k, v in labels.items()})
    return ResNetForImageClassification(config).eval()


def resnet_processor():
    """microsoft/resnet-50's preprocessor_config.json: ConvNextImageProcessor, shortest edge 224, crop_pct 0.875,
    resample 3 (bicubic), ImageNet mean/std; transformers' PIL backend."""
    from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil

    return ConvNextImageProcessorPil(
        do_resize=True, size={"shortest_edge": 224}, crop_pct=0.875, resample=3, do_normalize=True,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )


@pytest.mark.parametrize("h, w", [(256, 256)] + SIZES)
def test_resnet_matches_processor_and_model(h, w, resnet):
    images = [smooth_uint8(h, w, seed=s, **DETAILED) for s in (10, 11)]
    expected_pixels = resnet_processor()(images=[to_pil(i) for i in images], return_tensors="pt")["pixel_values"]
    pixels = resnet_preprocess(as_batch(images))
    difference = (pixels - expected_pixels).abs()
    if (h, w) == (256, 256):  # no resize: the crop alone, exact
        assert difference.max() < 1e-6
    else:  # uint8 rounding of the reference (0.5/255/0.229 at most); measured max / mean 0.044 / 0.0053
        assert difference.max() < 0.06 and difference.mean() < 0.007

    reward = ResNetTarget(resnet, class_index("tabby cat", resnet.config.id2label))
    scores = reward(as_batch(images), ["a photo of a mouse"] * 2)
    with torch.no_grad():
        logits = resnet(pixel_values=expected_pixels).logits
        expected = -F.cross_entropy(logits, torch.tensor([281, 281]), reduction="none")
    assert scores.shape == (2,) and scores.dtype == torch.float32 and (scores <= 0).all()
    # −cross-entropy = z_target − logsumexp(z) moves by at most 2·max|δz|: without a resize, the logits within
    # same_input_tolerance of each other (measured: equal); with one, the reference's uint8 rounding (measured 2e-4)
    exact_tolerance = 2 * same_input_tolerance(resnet) * float(logits.norm())
    torch.testing.assert_close(scores, expected, rtol=0, atol=exact_tolerance if (h, w) == (256, 256) else 1e-2)


def test_resnet_target_class_option():
    labels = imagenet_id2label()
    assert class_index("tabby cat", labels) == 281
    assert class_index("Tabby", labels) == 281  # any synonym, any case
    assert class_index("tabby, tabby cat", labels) == 281
    assert class_index("281", labels) == class_index(281, labels) == 281
    assert class_index("computer mouse", labels) == 673
    with pytest.raises(RewardSpecError, match=r"several ImageNet classes: 134 \(crane\); 517 \(crane\)"):
        class_index("crane", labels)
    with pytest.raises(RewardSpecError, match="close matches: 'tabby cat' \\(281\\)"):
        class_index("taby cat", labels)
    with pytest.raises(RewardSpecError, match="out of range"):
        class_index("1000", labels)


def test_resnet_loader_from_local_copy(tmp_path, resnet):
    resnet.save_pretrained(tmp_path / "resnet")
    images = as_batch([smooth_uint8(64, 80, seed=s) for s in (1, 2)])
    expected = ResNetTarget(resnet, 281)(images, PROMPTS)
    for target in ("281", "tabby cat"):
        reward = rewards.load(f"resnet50_target[model={tmp_path / 'resnet'};target={target}]")
        torch.testing.assert_close(reward(images, PROMPTS), expected)
    with pytest.raises(RewardSpecError, match="unknown target class 'cat'"):
        rewards.load(f"resnet50_target[model={tmp_path / 'resnet'};target=cat]")


# ---------------------------------------------------------------------------------------------- ImageReward
VISION = dict(width=32, depth=2, patch=16, image=224, heads=16)  # BLIP ViT-L: 1024, 24, 16, 224, 16
MED = dict(vocab_size=30524, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           max_position_embeddings=40, hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0,
           encoder_width=32, add_cross_attention=True)  # med_config.json's keys; BERT-base sizes in the real one
WORDS = "a photo of cat dog three apples on table in the snow".split()


def official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of the official `ImageReward` module's state_dict, keys and shapes as its code defines them
    (github.com/THUDM/ImageReward, ImageReward/ImageReward.py: `blip = BLIP_Pretrain(...)`, `mlp = MLP(768)`;
    models/BLIP/blip_pretrain.py: visual_encoder, text_encoder, vision_proj, text_proj; models/BLIP/vit.py:
    VisionTransformer with PatchEmbed, cls_token, pos_embed, Blocks (norm1, attn.qkv, attn.proj, norm2, mlp.fc1/2),
    norm; models/BLIP/med.py: BertModel(add_pooling_layer=False) with BertEmbeddings (word, position, LayerNorm,
    position_ids buffer), BertLayer (attention.self.query/key/value, attention.output.dense/LayerNorm,
    crossattention with key/value from encoder_width, intermediate.dense, output.dense/LayerNorm)), random values."""
    g = torch.Generator().manual_seed(seed)
    w, d, p = VISION["width"], VISION["depth"], VISION["patch"]
    hidden, inter = MED["hidden_size"], MED["intermediate_size"]
    shapes = {
        "blip.visual_encoder.cls_token": (1, 1, w),
        "blip.visual_encoder.pos_embed": (1, (VISION["image"] // p) ** 2 + 1, w),
        "blip.visual_encoder.patch_embed.proj.weight": (w, 3, p, p),
        "blip.visual_encoder.patch_embed.proj.bias": (w,),
        "blip.visual_encoder.norm.weight": (w,),
        "blip.visual_encoder.norm.bias": (w,),
        "blip.text_encoder.embeddings.word_embeddings.weight": (MED["vocab_size"], hidden),
        "blip.text_encoder.embeddings.position_embeddings.weight": (MED["max_position_embeddings"], hidden),
        "blip.text_encoder.embeddings.LayerNorm.weight": (hidden,),
        "blip.text_encoder.embeddings.LayerNorm.bias": (hidden,),
        "blip.vision_proj.weight": (256, w),
        "blip.vision_proj.bias": (256,),
        "blip.text_proj.weight": (256, hidden),
        "blip.text_proj.bias": (256,),
    }
    for i in range(d):
        block = f"blip.visual_encoder.blocks.{i}."
        for name, shape in [("norm1", (w,)), ("norm2", (w,)), ("attn.qkv", (3 * w, w)), ("attn.proj", (w, w)),
                            ("mlp.fc1", (4 * w, w)), ("mlp.fc2", (w, 4 * w))]:
            shapes[block + name + ".weight"] = shape
            shapes[block + name + ".bias"] = shape[:1]
    for i in range(MED["num_hidden_layers"]):
        layer = f"blip.text_encoder.encoder.layer.{i}."
        linears = [("attention.self.query", hidden, hidden), ("attention.self.key", hidden, hidden),
                   ("attention.self.value", hidden, hidden), ("attention.output.dense", hidden, hidden),
                   ("crossattention.self.query", hidden, hidden), ("crossattention.self.key", hidden, w),
                   ("crossattention.self.value", hidden, w), ("crossattention.output.dense", hidden, hidden),
                   ("intermediate.dense", inter, hidden), ("output.dense", hidden, inter)]
        for name, out, inp in linears:
            shapes[layer + name + ".weight"], shapes[layer + name + ".bias"] = (out, inp), (out,)
        for norm in ("attention.output.LayerNorm", "crossattention.output.LayerNorm", "output.LayerNorm"):
            shapes[layer + norm + ".weight"], shapes[layer + norm + ".bias"] = (hidden,), (hidden,)
    for i, (out, inp) in zip((0, 2, 4, 6, 7), [(1024, hidden), (128, 1024), (64, 128), (16, 64), (1, 16)]):
        shapes[f"mlp.layers.{i}.weight"], shapes[f"mlp.layers.{i}.bias"] = (out, inp), (out,)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("norm.weight") or key.endswith("LayerNorm.weight") or ".norm1.w" in key or ".norm2.w" in key:
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = shape[-1] if len(shape) > 1 else 4
            state[key] = torch.randn(shape, generator=g) / fan_in**0.5
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(MED["max_position_embeddings"])[None]
    return state


def official_score(state, pixel_values, input_ids, attention_mask) -> torch.Tensor:
    """The official forward (ImageReward.score_gard -> BLIP VisionTransformer.forward, med.py BertModel.forward in
    'multimodal' mode) written out from the state dict's tensors with torch.nn.functional."""

    def linear(x, key):
        return F.linear(x, state[key + ".weight"], state[key + ".bias"])

    def norm(x, key, eps):
        return F.layer_norm(x, x.shape[-1:], state[key + ".weight"], state[key + ".bias"], eps)

    def attention(q, k, v, heads, mask=None):
        split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if mask is not None:
            scores = scores + mask
        return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)

    vit = "blip.visual_encoder."
    x = F.conv2d(pixel_values, state[vit + "patch_embed.proj.weight"], state[vit + "patch_embed.proj.bias"],
                 stride=VISION["patch"]).flatten(2).transpose(1, 2)
    x = torch.cat([state[vit + "cls_token"].expand(len(x), -1, -1), x], 1) + state[vit + "pos_embed"]
    for i in range(VISION["depth"]):
        block = f"{vit}blocks.{i}."
        q, k, v = linear(norm(x, block + "norm1", 1e-6), block + "attn.qkv").chunk(3, -1)
        x = x + linear(attention(q, k, v, VISION["heads"]), block + "attn.proj")
        x = x + linear(F.gelu(linear(norm(x, block + "norm2", 1e-6), block + "mlp.fc1")), block + "mlp.fc2")
    image = norm(x, vit + "norm", 1e-6)

    bert, eps, heads = "blip.text_encoder.", MED["layer_norm_eps"], MED["num_attention_heads"]
    positions = state[bert + "embeddings.position_embeddings.weight"][: input_ids.shape[1]]
    words = state[bert + "embeddings.word_embeddings.weight"][input_ids]
    h = norm(words + positions, bert + "embeddings.LayerNorm", eps)
    mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0  # med.py get_extended_attention_mask
    for i in range(MED["num_hidden_layers"]):
        layer = f"{bert}encoder.layer.{i}."
        a = attention(*(linear(h, layer + f"attention.self.{n}") for n in ("query", "key", "value")), heads, mask)
        h = norm(linear(a, layer + "attention.output.dense") + h, layer + "attention.output.LayerNorm", eps)
        q = linear(h, layer + "crossattention.self.query")
        k, v = linear(image, layer + "crossattention.self.key"), linear(image, layer + "crossattention.self.value")
        a = attention(q, k, v, heads)  # the image attention mask is all ones: nothing masked
        h = norm(linear(a, layer + "crossattention.output.dense") + h, layer + "crossattention.output.LayerNorm", eps)
        f = linear(F.gelu(linear(h, layer + "intermediate.dense")), layer + "output.dense")
        h = norm(f + h, layer + "output.LayerNorm", eps)
    r = h[:, 0]
    for i in (0, 2, 4, 6, 7):  # Dropout between some layers: identity in eval
        r = linear(r, f"mlp.layers.{i}")
    return ((r - 0.16717362830052426) / 1.0333394966054072).squeeze(-1)  # ImageReward.__init__'s mean and std


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory):
    """BERT's uncased WordPiece tokenizer (transformers' BertTokenizer) on a small vocabulary written here."""
    from transformers import BertTokenizer

    vocab = tmp_path_factory.mktemp("bert") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    return BertTokenizer(vocab=str(vocab), do_lower_case=True)  # transformers 5 ignores vocab_file=: no words


def test_imagereward_checkpoint_converts_completely():
    official = official_state_dict()
    parts = convert_state_dict(official)
    reward = ImageRewardModel.from_official(official, MED, tokenizer=None, vision_heads=VISION["heads"])
    # every tensor of the three modules comes from the checkpoint (from_official loads strictly), and every
    # checkpoint tensor but BLIP's contrastive projections and the position_ids buffer is used
    for module, name in ((reward.vision, "vision"), (reward.text, "text"), (reward.mlp, "mlp")):
        assert set(module.state_dict()) == set(parts[name]), name
    used = sum(len(p) for p in parts.values())
    assert used == len(official) - 5  # vision_proj / text_proj weight and bias, position_ids
    torch.testing.assert_close(reward.vision.embeddings.class_embedding, official["blip.visual_encoder.cls_token"])
    with pytest.raises(RewardError, match="unexpected keys"):
        convert_state_dict({**official, "blip.itm_head.weight": torch.zeros(2, 32)})
    incomplete = {k: v for k, v in official.items() if k != "blip.text_encoder.encoder.layer.1.output.dense.bias"}
    with pytest.raises(RewardError, match="not an ImageReward checkpoint"):
        ImageRewardModel.from_official(incomplete, MED, tokenizer=None, vision_heads=VISION["heads"])


@pytest.mark.parametrize("h, w", [(224, 224), (512, 512)])
def test_imagereward_matches_official_forward(h, w, bert_tokenizer):
    official = official_state_dict()
    reward = ImageRewardModel.from_official(official, MED, bert_tokenizer, vision_heads=VISION["heads"])
    # the second prompt is longer than the 35 tokens ImageReward keeps
    prompts = ["a photo of three apples on a table", " ".join(["a dog in the snow"] * 10)]
    images = [smooth_uint8(h, w, seed=s) for s in (12, 13)]
    head_input = []
    hook = reward.mlp.register_forward_hook(lambda module, args, output: head_input.append(args[0].detach()))
    scores = reward(as_batch(images), prompts)
    hook.remove()

    from torchvision import transforms as T

    # ImageReward.py `_transform(224)`: Resize(224, BICUBIC) on PIL, CenterCrop, ToTensor, Normalize(CLIP)
    transform = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                           T.ToTensor(), T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])
    # ImageReward.score: padding='max_length', truncation=True, max_length=35
    tokens = bert_tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["input_ids"].shape == (2, 35) and (tokens["input_ids"][:, 0] == 2).all()  # [CLS] first
    with torch.no_grad():
        pixels = torch.stack([transform(to_pil(i)) for i in images])
        expected = official_score(official, pixels, tokens["input_ids"], tokens["attention_mask"])
    assert scores.shape == (2,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert (tokens["input_ids"][:, 1:8] != bert_tokenizer.unk_token_id).all()  # the words are in the vocabulary
    # At 224 (no resize) the reference is another computation of the same model on the same pixels: the head's input
    # (the [CLS] state h) within same_input_tolerance of each other, which the affine head scales by at most ‖w‖ (and
    # rounds), and the score divides by STD (measured 6e-7). At 512 the reference resizes in uint8: measured 4e-4.
    gain = affine_gain(reward.mlp) / STD
    exact_tolerance = gain * float(head_input[0].norm(dim=-1).max()) * (
        same_input_tolerance(reward.vision, reward.text) + pair_tolerance(rounding_tolerance(roundings(reward.mlp))))
    tolerance = exact_tolerance if h == 224 else 2e-3
    assert (expected[0] - expected[1]).abs() > 2 * tolerance  # the two pairs score apart: a swap would show
    torch.testing.assert_close(scores, expected, rtol=0, atol=tolerance)


def test_imagereward_loader_from_local_files(tmp_path, bert_tokenizer):
    official = official_state_dict(seed=1)
    torch.save(official, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(MED))
    bert_tokenizer.save_pretrained(tmp_path / "tokenizer")
    reward = rewards.load(
        f"imagereward[checkpoint={tmp_path / 'ImageReward.pt'};med_config={tmp_path / 'med_config.json'};"
        f"tokenizer={tmp_path / 'tokenizer'}]"
    )
    images = as_batch([smooth_uint8(224, 224, seed=s) for s in (1, 2)])
    # from_pretrained builds BLIP's ViT-L head count (16), as the tiny checkpoint here has
    expected = ImageRewardModel.from_official(official, MED, bert_tokenizer, vision_heads=16)(images, PROMPTS)
    torch.testing.assert_close(reward(images, PROMPTS), expected)
    assert reward.differentiable


# ---------------------------------------------------------------------------------------------- all of them
def test_gradients_reach_pixels(owlvit, resnet, bert_tokenizer):
    model, tokenizer = owlvit
    differentiable = {
        "owlvit_detect": OwlViTDetection(model, tokenizer, 1.0, ["a photo of an apple"]),
        "owlvit_remove": OwlViTDetection(model, tokenizer, -1.0, ["a photo of a person"]),
        "owlvit_count": OwlViTCount(model, tokenizer),
        "resnet50_target": ResNetTarget(resnet, 281),
        "imagereward": ImageRewardModel.from_official(official_state_dict(), MED, bert_tokenizer, VISION["heads"]),
    }
    for name, reward in differentiable.items():
        assert reward.differentiable, name
        images = as_batch([smooth_uint8(96, 96, seed=s) for s in (1, 2)]).requires_grad_(True)
        reward(images, PROMPTS).sum().backward()
        assert images.grad is not None and torch.isfinite(images.grad).all(), name
        assert images.grad.abs().sum() > 0, name
        assert all(p.grad is None for p in reward.parameters()), name  # frozen


def test_bfloat16_returns_float32(owlvit, resnet, bert_tokenizer):
    import copy

    model, tokenizer = owlvit
    official = official_state_dict()
    pairs = {  # threshold 0 for OWL-ViT: every box counts, so no box crosses the threshold between precisions
        "owlvit": [OwlViTDetection(m, tokenizer, 1.0, ["a photo of a cat"], threshold=0.0)
                   for m in (model, copy.deepcopy(model).to(torch.bfloat16))],
        "resnet": [ResNetTarget(m, 281) for m in (resnet, copy.deepcopy(resnet).to(torch.bfloat16))],
        "imagereward": [ImageRewardModel.from_official(official, MED, bert_tokenizer, VISION["heads"], dtype=dtype)
                        for dtype in (torch.float32, torch.bfloat16)],
    }
    images = as_batch([smooth_uint8(64, 64, seed=s) for s in (1, 2)])
    for name, (full, half) in pairs.items():
        expected, scores = full(images, PROMPTS), half(images, PROMPTS)
        assert scores.dtype == torch.float32 and torch.isfinite(scores).all(), name
        torch.testing.assert_close(scores, expected, rtol=0.02, atol=0.05, msg=name)


# ---------------------------------------------------------------------------------------------- registry
def test_registry_names_flags_and_options(tmp_path, owlvit):
    model, tokenizer = owlvit
    for name in ("owlvit_detect", "owlvit_remove", "owlvit_count", "resnet50_target", "imagereward"):
        assert name in rewards.REWARDS and rewards.is_differentiable(name), name
    assert "owlvit_count_exact" in rewards.REWARDS and not rewards.is_differentiable("owlvit_count_exact")

    # the spec's options reach the reward: local copy, queries (a '|' list), threshold
    model.save_pretrained(tmp_path / "owlvit")
    tokenizer.save_pretrained(tmp_path / "owlvit")
    spec = f"owlvit_remove[model={tmp_path / 'owlvit'};queries=a photo of a cat|a photo of a dog;threshold=0.2]:0.5"
    reward = rewards.load(spec)
    images = as_batch([smooth_uint8(64, 64, seed=s) for s in (1, 2)])
    direct = OwlViTDetection(model, tokenizer, -1.0, ["a photo of a cat", "a photo of a dog"], threshold=0.2)
    torch.testing.assert_close(reward(images, PROMPTS), 0.5 * direct(images, PROMPTS))
    for bad in ("owlvit_detect[threshold=high]", "owlvit_detect[threshold=1]", "owlvit_remove[queries=a||b]",
                "owlvit_count[queries=a cat]", "resnet50_target[target=tabby cat;k=1]"):
        with pytest.raises(RewardSpecError):
            rewards.load(bad)  # refused before anything loads (there is no network here)


@pytest.mark.parametrize(
    "name, downloads, option",
    [
        ("owlvit_detect", ["hf download google/owlvit-base-patch32 --include '*.json' '*.txt' model.safetensors"],
         "model"),
        ("owlvit_count", ["hf download google/owlvit-base-patch32"], "model"),
        ("resnet50_target", ["hf download microsoft/resnet-50 config.json model.safetensors"], "model"),
        ("imagereward", ["hf download THUDM/ImageReward ImageReward.pt med_config.json",
                         "hf download google-bert/bert-base-uncased vocab.txt"], "checkpoint"),
    ],
)
def test_offline_error_names_the_download(name, downloads, option, offline_empty_cache):
    with pytest.raises(WeightsNotFound) as info:
        rewards.load(name)
    message = str(info.value)
    assert all(command in message for command in downloads), message
    assert f"{name}[" in message and f"{option}=PATH" in message, message
