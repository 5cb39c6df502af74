"""Rewards: the scoring code of every reward on its real architecture built tiny from config (random weights),
checked against the official pipelines (PIL/transformers processors, open_clip's transform and model call,
PIL's JPEG encoder, kornia's codec) computed independently here. CPU only, no network."""

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import rewards
from conftest import pair_tolerance, rounding_tolerance, roundings
from rewards._base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess
from rewards.aesthetic import AestheticMLP, AestheticReward
from rewards.hps import HPSReward
from rewards.pickscore import PickScoreReward

ROOT = Path(__file__).resolve().parents[1]
AESTHETIC_HEAD = ROOT.parent / "shared" / "data" / "sac+logos+ava1-l14-linearMSE.pth"
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon, trending on artstation"]
TINY_OPEN_CLIP = "rewards-test-tiny-vit"  # an open_clip model config of ViT-H-14's type, registered below
# 512x512 is SD1.4's output; 384x512 and 512x300 are non-square (even crop margins, where transformers' floor
# and torchvision's round agree on the crop offset).
SIZES = [(512, 512), (384, 512), (512, 300)]
DETAILED = dict(cells=48, texture=0.1)  # enough detail that the choice of interpolation kernel shows


# ---------------------------------------------------------------------------------------------- helpers
def smooth_uint8(h: int, w: int, seed: int, cells: int = 12, texture: float = 0.03) -> torch.Tensor:
    """A random but smooth RGB image [3, H, W] uint8 (bicubic upsampling of random cells + some texture)."""
    g = torch.Generator().manual_seed(seed)
    cells = min(cells, h, w)
    x = F.interpolate(torch.rand(1, 3, cells, cells, generator=g), size=(h, w), mode="bicubic", align_corners=False)
    x = x + texture * torch.rand(1, 3, h, w, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)[0]


def noise_uint8(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def as_batch(images_uint8: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(images_uint8).float() / 255


def to_pil(image_uint8: torch.Tensor) -> Image.Image:
    return Image.fromarray(image_uint8.permute(1, 2, 0).numpy())


def affine_gain(head) -> float:
    """‖w‖ of an affine head (AestheticMLP has no activations: w·x + b), the most it scales an input's error."""
    import copy

    head = copy.deepcopy(head).double().eval()
    d = head.layers[0].in_features
    with torch.no_grad():
        return float((head(torch.eye(d, dtype=torch.float64)) - head(torch.zeros(1, d, dtype=torch.float64))).norm())


def same_input_tolerance(*towers) -> float:
    """Without a resize, ours and the reference feed the same pixels to the same model in the same batch layout, up to
    the normalisation's rounding (another order of the same operations): both within conftest's bound t of the exact
    output, so within 2t of each other (relative, normwise); unit-normalised features within 4t."""
    return pair_tolerance(rounding_tolerance(roundings(*towers) + 8))


def features(output) -> torch.Tensor:
    """`get_image_features` / `get_text_features` return a tensor before transformers 5, a ModelOutput after."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def openai_clip_processor():
    """`openai/clip-vit-large-patch14`'s preprocessor_config.json (the same values as
    `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`'s), with transformers' PIL backend: the pipeline DDPO's
    aesthetic scorer and PickScore's model card ran."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": 224},
        resample=3,  # PIL.Image.BICUBIC
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )


def tiny_hf_clip(projection_dim: int, seed: int = 0):
    """transformers CLIPModel with CLIP's real vocabulary and image size, everything else tiny."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
        ),
        vision_config=dict(
            image_size=224,
            patch_size=32,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=projection_dim,
    )
    return CLIPModel(config).eval()


class OfficialAestheticMLP(torch.nn.Module):
    """improved-aesthetic-predictor's MLP class as published (simple_inference.py), written out independently."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(768, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hf_tokenizer():
    """A transformers CLIPTokenizer with the real CLIP BPE, rebuilt offline from open_clip's bundled vocabulary
    (the hub tokenizer of laion/CLIP-ViT-H-14-laion2B-s32B-b79K is the same BPE)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda item: item[1])]
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # open_clip's names
    vocab = {special.get(token, token): i for token, i in simple.encoder.items()}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


@pytest.fixture(scope="module")
def head_state_dict():
    """The real LAION head when it is beside the project, otherwise a random one of the same shape."""
    if AESTHETIC_HEAD.is_file():
        return torch.load(AESTHETIC_HEAD, map_location="cpu", weights_only=True)
    torch.manual_seed(1)
    return AestheticMLP().state_dict()


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """open_clip's CLIP class (ViT image tower + text transformer, the type of ViT-H-14), built through
    `open_clip.create_model` from a registered tiny config, as HPSReward.from_pretrained builds ViT-H-14."""
    import json

    import open_clip

    config_dir = tmp_path_factory.mktemp("open_clip_configs")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    (config_dir / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(config_dir)
    torch.manual_seed(0)
    return open_clip.create_model(TINY_OPEN_CLIP, pretrained=None).eval()


# ---------------------------------------------------------------------------------------------- registry
def test_names_and_import_is_light():
    assert set(rewards.REWARDS) == {
        "aesthetic",
        "hpsv2",
        "hpsv21",
        "pickscore",
        "jpeg_compressibility",
        "jpeg_incompressibility",
        "jpeg_compressibility_diff",
        "jpeg_incompressibility_diff",
        "shapes_alignment",
        "shapes_exact_match",
        "owlvit_detect",
        "owlvit_remove",
        "owlvit_count",
        "owlvit_count_exact",
        "resnet50_target",
        "imagereward",
        "llava_bertscore",
        "remote",
    }
    heavy = ("transformers", "open_clip", "kornia", "diffusers")
    code = f"import sys, rewards; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_parse_and_is_differentiable():
    T = rewards.Term
    assert rewards.parse("hpsv2:1,aesthetic:0.1") == [T("hpsv2", 1.0, {}), T("aesthetic", 0.1, {})]
    assert rewards.parse(" pickscore ") == [T("pickscore", 1.0, {})]
    assert rewards.parse("jpeg_compressibility:-2.5e-1") == [T("jpeg_compressibility", -0.25, {})]
    with pytest.raises(rewards.RewardSpecError, match="known rewards: aesthetic, hpsv2"):
        rewards.parse("hpsv3")
    malformed = ["hpsv2:abc", "hpsv2:", "hpsv2:1:2", "hpsv2:nan", "hpsv2:inf", "hpsv2,,aesthetic", "", ":1"]
    for bad in malformed + ["hpsv2,hpsv2:2"]:
        with pytest.raises(rewards.RewardSpecError):
            rewards.parse(bad)
    assert rewards.is_differentiable("hpsv2:1,aesthetic:0.1,pickscore,jpeg_incompressibility_diff")
    assert not rewards.is_differentiable("jpeg_compressibility")
    assert not rewards.is_differentiable("hpsv2:1,jpeg_incompressibility:0.1")
    assert not rewards.is_differentiable("http://127.0.0.1:8085,jpeg_compressibility_diff")
    with pytest.raises(TypeError, match="aesthetic_head"):
        rewards.load("jpeg_compressibility", aesthetic_heads="x.pth")  # a typo in an option name


def test_spec_grammar_options_and_urls():
    T = rewards.Term
    # commas and colons inside brackets split nothing; keys and values are stripped; list values stay text
    assert rewards.parse("aesthetic[head=/m/a,b:c.pth; clip = /m/clip]:2,hpsv2[checkpoint=x.pt]") == [
        T("aesthetic", 2.0, {"head": "/m/a,b:c.pth", "clip": "/m/clip"}),
        T("hpsv2", 1.0, {"checkpoint": "x.pt"}),
    ]
    # a bare URL is the remote reward with weight 1; remote[url=...] weighs one; colons of the port split nothing
    assert rewards.parse("http://127.0.0.1:8085,jpeg_compressibility:0.5") == [
        T("remote", 1.0, {"url": "http://127.0.0.1:8085"}),
        T("jpeg_compressibility", 0.5, {}),
    ]
    assert rewards.parse("https://gpu7.example:443/rewards/llava/") == [
        T("remote", 1.0, {"url": "https://gpu7.example:443/rewards/llava"})
    ]
    assert rewards.parse("remote[url=http://127.0.0.1:8085;timeout=5]:0.25,http://[::1]:8086") == [
        T("remote", 0.25, {"url": "http://127.0.0.1:8085", "timeout": "5"}),
        T("remote", 1.0, {"url": "http://[::1]:8086"}),
    ]
    # a comma inside a URL splits only where a new term starts
    assert [t.options["url"] for t in rewards.parse("http://h:1/a,b=2")] == ["http://h:1/a,b=2"]
    terms = rewards.parse("http://h:1,http://h:2,aesthetic")
    assert [t.text for t in terms] == ["http://h:1", "http://h:2", "aesthetic"]
    # the same reward with different options is two terms, keyed by their text
    terms = rewards.parse("aesthetic, aesthetic[head=h.pth]:0.5")
    assert [(t.text, t.weight) for t in terms] == [("aesthetic", 1.0), ("aesthetic[head=h.pth]", 0.5)]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("hpsv3:1", r"unknown reward 'hpsv3' in 'hpsv3:1'; known rewards: aesthetic, hpsv2, .*remote"),
        ("aesthetic[heads=x]", r"unknown option 'heads' of reward 'aesthetic' in 'aesthetic\[heads=x\]'; its options "
                               r"are clip: hub id or directory of openai/clip-vit-large-patch14.*; head: file sac"),
        ("jpeg_compressibility[quality=90]", r"reward 'jpeg_compressibility' takes no options"),
        ("aesthetic[head]", r"malformed option 'head' in 'aesthetic\[head\]', expected key=value"),
        ("aesthetic[head=]", r"malformed option 'head=' in"),
        ("aesthetic[]", r"malformed option '' in 'aesthetic\[\]'"),
        ("aesthetic[head=a;head=b]", r"option 'head' given twice in 'aesthetic\[head=a;head=b\]'"),
        ("aesthetic[head=x", r"'\[' without '\]' in reward spec"),
        ("aesthetic]:1", r"'\]' without '\[' in reward spec"),
        ("aesthetic[a=[b]]", r"nested '\[' in reward spec"),
        ("aesthetic[head=x]junk", r"malformed term 'aesthetic\[head=x\]junk'"),
        ("aesthetic:0.1x", r"malformed weight '0.1x' of 'aesthetic' in reward spec 'aesthetic:0.1x', expected a"),
        ("aesthetic:inf", r"malformed weight 'inf'"),
        ("aesthetic,,hpsv2", r"empty term '' in reward spec 'aesthetic,,hpsv2'"),
        ("hpsv2, hpsv2:2", r"reward 'hpsv2' appears twice in 'hpsv2, hpsv2:2'"),
        ("http://h:1,remote[url=http://h:1]:2", r"reward 'http://h:1' appears twice"),
        ("http://h:port", r"malformed reward server URL 'http://h:port'; expected http://host:port"),
        ("http://:8085", r"malformed reward server URL"),
        ("http://h:1?x=1", r"malformed reward server URL"),
        ("http://h:1,aesthtic", r"unknown reward 'aesthtic'"),
        ("   ", r"empty reward spec"),
    ],
)
def test_spec_errors_name_the_bad_part(spec, message):
    with pytest.raises(rewards.RewardSpecError, match=message) as info:
        rewards.parse(spec)
    text = str(info.value)
    assert "\n" not in text
    # one sentence that shows the grammar by example, or lists what is known, or says what is repeated
    assert any(part in text for part in ("e.g. ", "known rewards: ", "its options are ", "twice")), text


def test_spec_options_reach_the_builder_with_precedence(monkeypatch, tmp_path):
    """spec option > load() keyword > environment variable: the builder receives the winning path (a missing
    local file names it), and an option's value goes to the builder's keyword."""
    env, keyword, spec = (str(tmp_path / f"{n}.pt") for n in ("env", "keyword", "spec"))
    monkeypatch.setenv("REWARDS_HPSV2_CHECKPOINT", env)
    for kwargs, spec_text, expected in [
        ({}, "hpsv2", env),
        ({"hpsv2_checkpoint": keyword}, "hpsv2", keyword),
        ({"hpsv2_checkpoint": keyword}, f"hpsv2[checkpoint={spec}]", spec),
    ]:
        with pytest.raises(rewards.WeightsNotFound, match=re.escape(repr(expected)) + " .*does not exist"):
            rewards.load(spec_text, **kwargs)
    with pytest.raises(rewards.RewardSpecError, match="option retries='many' is not an integer"):
        rewards.load("remote[url=http://127.0.0.1:9;retries=many]")
    with pytest.raises(rewards.RewardSpecError, match="reward 'remote' needs a server URL"):
        rewards.load("remote")


NEURAL = ("transformers", "open_clip", "kornia")  # what the neural and differentiable-JPEG rewards import


def test_loading_a_reward_imports_its_module_only():
    """`import rewards` and loading the PIL JPEG reward import no other reward's module and none of the libraries
    the neural rewards need (a script's --help and a copied script pull in only what they use); the registry still
    lists every reward."""
    code = ("import sys, rewards; rewards.load('jpeg_compressibility'); print(rewards.REWARDS); "
            "print(sorted(m for m in sys.modules if m.startswith('rewards.') or m.split('.')[0] in "
            f"{NEURAL!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed, loaded = map(eval, proc.stdout.splitlines())
    assert listed == (
        "aesthetic", "hpsv2", "hpsv21", "pickscore", "jpeg_compressibility", "jpeg_incompressibility",
        "jpeg_compressibility_diff", "jpeg_incompressibility_diff", "shapes_alignment", "shapes_exact_match",
        "owlvit_detect", "owlvit_remove", "owlvit_count", "owlvit_count_exact", "resnet50_target", "imagereward",
        "llava_bertscore", "remote")
    reward_modules = {m for m in loaded if m.startswith("rewards.") and not m.startswith("rewards._")}
    assert reward_modules == {"rewards.jpeg"}, loaded
    assert not [m for m in loaded if m.split(".")[0] in NEURAL], loaded


def test_every_registry_entry_names_its_builder():
    """Each "module:callable" of the registry resolves, and its class says what the registry says about gradients."""
    for name, entry in rewards._REGISTRY.items():
        module, _, path = entry.target.partition(":")
        owner = getattr(entry.module, path.split(".")[0])
        assert entry.module.__name__ == f"rewards.{module}" and callable(owner), name
        assert owner.differentiable == entry.differentiable, name


def test_every_option_is_described():
    for name, entry in rewards._REGISTRY.items():
        assert set(entry.help) == set(entry.options), name
        assert set(entry.paths) <= set(entry.options), name


# ---------------------------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("h, w", SIZES)
def test_clip_preprocess_matches_transformers_processors(h, w):
    from transformers import CLIPImageProcessor

    image = smooth_uint8(h, w, seed=h + w, **DETAILED)
    ours = clip_preprocess(as_batch([image]))
    # Measured: max |diff| 0.02, mean 0.0042 (normalised units) against both backends: the reference's rounding to
    # uint8 after resizing (1/255/std = 0.015 at most, 0.004 on average). Bilinear instead of bicubic gives mean
    # 0.02, no antialiasing far more.
    for processor in [openai_clip_processor(), CLIPImageProcessor()]:  # PIL backend, torchvision backend
        reference = processor(images=to_pil(image), return_tensors="pt")["pixel_values"]
        assert reference.shape == ours.shape == (1, 3, 224, 224)
        diff = (ours - reference).abs()
        assert diff.max() < 0.05 and diff.mean() < 0.006, (diff.max(), diff.mean())


@pytest.mark.parametrize("h, w", SIZES + [(224, 224)])
def test_clip_preprocess_matches_open_clip_transform(h, w):
    import open_clip

    image = smooth_uint8(h, w, seed=h * w, **DETAILED)
    reference = open_clip.image_transform(224, is_train=False)(to_pil(image)).unsqueeze(0)  # HPSv2's preprocess_val
    diff = (clip_preprocess(as_batch([image])) - reference).abs()
    # Measured: max 0.02, mean 0.0042 when resizing (uint8 rounding of PIL's output, as above); 0 at 224x224.
    if (h, w) == (224, 224):
        assert diff.max() < 1e-5
    assert diff.max() < 0.05 and diff.mean() < 0.006, (diff.max(), diff.mean())


def test_clip_preprocess_upsamples_tiny_images():
    import open_clip

    image = smooth_uint8(32, 32, seed=3)  # the tiny SD model's 32x32 samples
    open_clip_reference = open_clip.image_transform(224, is_train=False)(to_pil(image)).unsqueeze(0)
    reference = openai_clip_processor()(images=to_pil(image), return_tensors="pt")["pixel_values"]
    ours = clip_preprocess(as_batch([image]))
    # Measured: max 0.07, mean 0.0043 (bilinear: 0.04 mean). PIL upsamples in two passes rounding to uint8 in
    # between; the kernel is the same (bicubic with a = -0.5, which torch uses with antialias=True).
    for ref in (reference, open_clip_reference):
        diff = (ours - ref).abs()
        assert diff.max() < 0.15 and diff.mean() < 0.008, (diff.max(), diff.mean())


# ---------------------------------------------------------------------------------------------- aesthetic
def test_aesthetic_head_loads_real_checkpoint_like_official_mlp():
    if not AESTHETIC_HEAD.is_file():
        pytest.skip(f"{AESTHETIC_HEAD} not present")
    state = torch.load(AESTHETIC_HEAD, map_location="cpu", weights_only=True)
    official = OfficialAestheticMLP().eval()
    official.load_state_dict(state, strict=True)
    ours = AestheticMLP.from_file(str(AESTHETIC_HEAD)).eval()  # strict=True inside
    embedding = F.normalize(torch.randn(4, 768, generator=torch.Generator().manual_seed(0)), dim=-1)
    torch.testing.assert_close(ours(embedding), official(embedding), rtol=0, atol=1e-6)


@pytest.mark.parametrize("h, w", [(224, 224)] + SIZES)
def test_aesthetic_matches_official_pipeline(h, w, head_state_dict):
    clip = tiny_hf_clip(projection_dim=768)
    mlp = AestheticMLP()
    mlp.load_state_dict(head_state_dict)
    reward = AestheticReward(clip, mlp)
    images = [smooth_uint8(h, w, seed=s) for s in (10, 11, 12)]
    scores = reward(as_batch(images), PROMPTS[:1] * 3)

    # DDPO's aesthetic scorer: processor -> get_image_features -> / norm -> MLP
    official = OfficialAestheticMLP().eval()
    official.load_state_dict(head_state_dict)
    with torch.no_grad():
        pixel_values = openai_clip_processor()(images=[to_pil(i) for i in images], return_tensors="pt")["pixel_values"]
        embedding = features(clip.get_image_features(pixel_values=pixel_values))
        expected = official(embedding / embedding.norm(dim=-1, keepdim=True)).squeeze(1)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    # Without a resize: the head (affine) scales the unit embedding's error (2·same_input_tolerance) by ‖w‖, plus its
    # own rounding. Otherwise the reference's uint8 rounding (above, the same on every machine) moves the score:
    # measured max |diff| 6e-4 with the real head (scores about 5.7, spread 0.1 between these images).
    gain = affine_gain(mlp)
    exact_tolerance = gain * (2 * same_input_tolerance(clip.vision_model, clip.visual_projection)
                              + pair_tolerance(rounding_tolerance(roundings(mlp))))
    tolerance = exact_tolerance if (h, w) == (224, 224) else 2e-3 * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(scores, expected, rtol=0, atol=tolerance)


def test_aesthetic_loader_from_local_copies(tmp_path, head_state_dict):
    clip = tiny_hf_clip(projection_dim=768, seed=3)
    clip.save_pretrained(tmp_path / "clip")
    head = tmp_path / "head.pth"
    torch.save(head_state_dict, head)
    reward = rewards.load("aesthetic", aesthetic_clip=str(tmp_path / "clip"), aesthetic_head=str(head))
    mlp = AestheticMLP()
    mlp.load_state_dict(head_state_dict)
    images = as_batch([smooth_uint8(64, 64, seed=s) for s in (1, 2)])
    torch.testing.assert_close(reward(images, PROMPTS), AestheticReward(clip, mlp)(images, PROMPTS))
    assert reward.differentiable and set(reward.last_components) == {"aesthetic"}
    assert not any(p.requires_grad for p in reward.parameters())


# ---------------------------------------------------------------------------------------------- HPS
@pytest.mark.parametrize("h, w", [(224, 224)] + SIZES)
def test_hps_matches_official_scoring(h, w, tiny_open_clip):
    import open_clip

    tokenizer = open_clip.get_tokenizer(TINY_OPEN_CLIP)
    reward = HPSReward(tiny_open_clip, tokenizer)
    images = [smooth_uint8(h, w, seed=s) for s in (20, 21)]
    scores = reward(as_batch(images), PROMPTS)

    # hpsv2/img_score.py: preprocess_val(PIL) -> model(image, text) -> diag(image_features @ text_features.T)
    preprocess_val = open_clip.image_transform(224, is_train=False)
    with torch.no_grad():
        image_features, text_features = tiny_open_clip(
            torch.stack([preprocess_val(to_pil(i)) for i in images]), tokenizer(PROMPTS)
        )[:2]
        expected = torch.diagonal(image_features @ text_features.T)
    assert scores.shape == (2,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    # a cosine of unit features (the text side identical): 2·same_input_tolerance without a resize (measured 1e-8);
    # with one, the reference's uint8 rounding: measured 3e-4 (scores 0.12-0.19)
    exact_tolerance = 2 * same_input_tolerance(tiny_open_clip.visual)
    tolerance = exact_tolerance if (h, w) == (224, 224) else 1e-3
    torch.testing.assert_close(scores, expected, rtol=0, atol=tolerance)


def test_hps_loader_reads_state_dict_checkpoint(tmp_path, tiny_open_clip):
    import open_clip

    checkpoint = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": tiny_open_clip.state_dict()}, checkpoint)  # the layout of the released files
    loaded = HPSReward.from_pretrained("v2", checkpoint=str(checkpoint), arch=TINY_OPEN_CLIP)
    images = as_batch([smooth_uint8(96, 128, seed=s) for s in (5, 6)])
    expected = HPSReward(tiny_open_clip, open_clip.get_tokenizer(TINY_OPEN_CLIP))(images, PROMPTS)
    torch.testing.assert_close(loaded(images, PROMPTS), expected)
    with pytest.raises(ValueError):
        HPSReward.from_pretrained("v3", checkpoint=str(checkpoint), arch=TINY_OPEN_CLIP)


def test_hps_in_bfloat16_returns_float32(tiny_open_clip):
    import copy

    import open_clip

    tokenizer = open_clip.get_tokenizer(TINY_OPEN_CLIP)
    images = as_batch([smooth_uint8(64, 64, seed=s) for s in (7, 8)])
    full = HPSReward(tiny_open_clip, tokenizer)(images, PROMPTS)
    half = HPSReward(copy.deepcopy(tiny_open_clip).to(torch.bfloat16), tokenizer)(images, PROMPTS)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0, atol=0.05)


# ---------------------------------------------------------------------------------------------- PickScore
def test_rebuilt_tokenizer_matches_open_clip(hf_tokenizer):
    import open_clip

    reference = open_clip.get_tokenizer("ViT-H-14")(PROMPTS)
    ids = hf_tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")["input_ids"]
    for row, ref in zip(ids, reference):
        n = int((ref != 0).sum())
        assert row[:n].tolist() == ref[:n].tolist()


@pytest.mark.parametrize("h, w", [(224, 224)] + SIZES)
def test_pickscore_matches_model_card(h, w, hf_tokenizer):
    model = tiny_hf_clip(projection_dim=16)
    reward = PickScoreReward(model, hf_tokenizer)
    images = [smooth_uint8(h, w, seed=s) for s in (30, 31)]
    scores = reward(as_batch(images), PROMPTS)

    # yuvalkirstain/PickScore_v1's model card, one (image, prompt) pair per row
    with torch.no_grad():
        image_inputs = openai_clip_processor()(images=[to_pil(i) for i in images], return_tensors="pt")
        text_inputs = hf_tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embs = features(model.get_image_features(**image_inputs))
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = features(model.get_text_features(**text_inputs))
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        expected = torch.diagonal(model.logit_scale.exp() * (text_embs @ image_embs.T))
    assert scores.shape == (2,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    # logit_scale.exp() = 14.3 here (100 in PickScore) times a cosine of unit features: without a resize within
    # that times 2·same_input_tolerance (measured 2e-7); with one, the uint8 rounding: measured 5e-3 (scores -2.4 to 1.6)
    exact_tolerance = float(model.logit_scale.exp()) * 2 * same_input_tolerance(model.vision_model,
                                                                               model.visual_projection)
    tolerance = exact_tolerance if (h, w) == (224, 224) else 0.02
    torch.testing.assert_close(scores, expected, rtol=0, atol=tolerance)


def test_pickscore_loader_from_local_copies(tmp_path, hf_tokenizer):
    model = tiny_hf_clip(projection_dim=16, seed=4)
    model.save_pretrained(tmp_path / "model")
    hf_tokenizer.save_pretrained(tmp_path / "processor")
    reward = rewards.load(
        "pickscore", pickscore_model=str(tmp_path / "model"), pickscore_processor=str(tmp_path / "processor")
    )
    images = as_batch([smooth_uint8(64, 80, seed=s) for s in (1, 2)])
    torch.testing.assert_close(reward(images, PROMPTS), PickScoreReward(model, hf_tokenizer)(images, PROMPTS))
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward(images, PROMPTS[:1])


# ---------------------------------------------------------------------------------------------- gradients
def test_gradients_reach_pixels(tiny_open_clip, hf_tokenizer, head_state_dict):
    import open_clip

    mlp = AestheticMLP()
    mlp.load_state_dict(head_state_dict)
    neural = {
        "aesthetic": AestheticReward(tiny_hf_clip(projection_dim=768), mlp),
        "hpsv2": HPSReward(tiny_open_clip, open_clip.get_tokenizer(TINY_OPEN_CLIP)),
        "pickscore": PickScoreReward(tiny_hf_clip(projection_dim=16), hf_tokenizer),
    }
    jpeg = {name: rewards.load(name) for name in ("jpeg_compressibility_diff", "jpeg_incompressibility_diff")}
    for name, reward in {**neural, **jpeg}.items():
        assert reward.differentiable and rewards.is_differentiable(name), name
        reward.train()  # a caller's .train() must not switch on the head's Dropout
        assert not any(m.training for m in reward.modules()), name
        images = as_batch([smooth_uint8(64, 64, seed=s) for s in (1, 2)]).requires_grad_(True)
        reward(images, PROMPTS).sum().backward()
        assert images.grad is not None and torch.isfinite(images.grad).all(), name
        assert images.grad.abs().sum() > 0, name
        assert all(p.grad is None for p in reward.parameters()), name  # frozen


def test_non_differentiable_rewards():
    for name in ("jpeg_compressibility", "jpeg_incompressibility"):
        reward = rewards.load(name)
        assert reward.differentiable is False and not rewards.is_differentiable(name)
        images = torch.rand(2, 3, 32, 32, requires_grad=True)
        assert not reward(images, PROMPTS).requires_grad
    assert rewards.load("jpeg_compressibility_diff,jpeg_compressibility").differentiable is False


# ---------------------------------------------------------------------------------------------- JPEG
def test_jpeg_size_is_pil_file_size():
    images = [smooth_uint8(64, 48, seed=1), noise_uint8(64, 48, seed=2)]
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        to_pil(image).save(buffer, format="JPEG", quality=95)
        sizes.append(len(buffer.getvalue()) / 1000)
    expected = torch.tensor(sizes)
    batch = as_batch(images)
    torch.testing.assert_close(rewards.load("jpeg_compressibility")(batch, PROMPTS), -expected)
    torch.testing.assert_close(rewards.load("jpeg_incompressibility")(batch, PROMPTS), expected)
    assert expected[0] < expected[1]  # noise does not compress


@pytest.mark.parametrize("h, w", [(32, 32), (512, 512), (40, 24)])
def test_jpeg_distortion_matches_kornia_and_real_jpeg(h, w):
    from kornia.enhance import jpeg_codec_differentiable

    smooth, noise = smooth_uint8(h, w, seed=0, cells=6), noise_uint8(h, w, seed=1)
    images = as_batch([smooth, noise])
    compressibility = rewards.load("jpeg_compressibility_diff")(images, PROMPTS)
    incompressibility = rewards.load("jpeg_incompressibility_diff")(images, PROMPTS)
    expected = ((images - jpeg_codec_differentiable(images, torch.tensor([50.0]))) * 255).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(compressibility, -expected)
    torch.testing.assert_close(incompressibility, expected)
    assert compressibility[0] > compressibility[1]  # the smooth image survives JPEG better than noise
    # kornia's codec models a real JPEG round trip: PIL's at quality 50 distorts by a similar amount
    # (measured ratios kornia / PIL 0.86-0.99).
    for image, distortion in zip((smooth, noise), expected):
        buffer = io.BytesIO()
        to_pil(image).save(buffer, format="JPEG", quality=50)
        decoded = torch.from_numpy(np.array(Image.open(buffer))).permute(2, 0, 1).float()
        pil_distortion = (decoded - image.float()).pow(2).mean()
        assert 0.5 < distortion / pil_distortion < 2


def test_weighted_sum():
    from kornia.enhance import jpeg_codec_differentiable

    images = as_batch([smooth_uint8(32, 32, seed=0, cells=4), noise_uint8(32, 32, seed=1)])
    reward = rewards.load("jpeg_compressibility_diff:2,jpeg_incompressibility_diff:0.5")
    mse = ((images - jpeg_codec_differentiable(images, torch.tensor([50.0]))) * 255).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(reward(images, PROMPTS), 2 * -mse + 0.5 * mse)
    torch.testing.assert_close(reward.last_components["jpeg_compressibility_diff"], -mse)
    torch.testing.assert_close(reward.last_components["jpeg_incompressibility_diff"], mse)
    assert reward.differentiable

    mixed = rewards.load("jpeg_incompressibility:0.1, jpeg_compressibility_diff")
    buffers = [io.BytesIO() for _ in range(2)]
    for buffer, image in zip(buffers, (images * 255).round().to(torch.uint8)):
        to_pil(image).save(buffer, format="JPEG", quality=95)
    sizes = torch.tensor([len(b.getvalue()) / 1000 for b in buffers])
    torch.testing.assert_close(mixed(images, PROMPTS), 0.1 * sizes - mse)
    assert not mixed.differentiable


# ---------------------------------------------------------------------------------------------- offline errors
@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    # huggingface_hub reads both variables when it is imported: patch what it computed from them too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for option in rewards._OPTIONS:
        monkeypatch.delenv(f"REWARDS_{option.upper()}", raising=False)


@pytest.mark.parametrize(
    "name, repo, what, option, also",
    [
        (
            "aesthetic",
            "camenduru/improved-aesthetic-predictor",
            "sac+logos+ava1-l14-linearMSE.pth",
            "aesthetic_head",
            "hf download openai/clip-vit-large-patch14 config.json model.safetensors",
        ),
        ("hpsv2", "xswu/HPSv2", "HPS_v2_compressed.pt", "hpsv2_checkpoint", ""),
        ("hpsv21", "xswu/HPSv2", "HPS_v2.1_compressed.pt", "hpsv21_checkpoint", ""),
        (
            "pickscore",
            "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
            "*.json",
            "pickscore_model",
            "hf download yuvalkirstain/PickScore_v1 config.json model.safetensors",
        ),
    ],
)
def test_offline_error_names_what_to_download(name, repo, what, option, also, offline_empty_cache):
    with pytest.raises(FileNotFoundError) as info:
        rewards.load(name)
    message = str(info.value)
    assert f"hf download {repo}" in message and what in message and also in message, message
    assert f"{option}=PATH" in message and f"REWARDS_{option.upper()}" in message, message


def test_offline_error_for_missing_model_and_local_paths(tmp_path, hf_tokenizer, head_state_dict, offline_empty_cache):
    hf_tokenizer.save_pretrained(tmp_path / "processor")
    with pytest.raises(FileNotFoundError, match="hf download yuvalkirstain/PickScore_v1 config.json model.safetensors"):
        rewards.load("pickscore", pickscore_processor=str(tmp_path / "processor"))
    torch.save(head_state_dict, tmp_path / "head.pth")  # the head is read first: it must be a valid one
    with pytest.raises(FileNotFoundError, match="hf download openai/clip-vit-large-patch14"):
        rewards.load("aesthetic", aesthetic_head=str(tmp_path / "head.pth"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rewards.load("hpsv2", hpsv2_checkpoint=str(tmp_path / "missing.pt"))
