"""The tiny-shapes testbed: data generator, the committed model folder, the shapes rewards, and a short DRaFT run."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

import common
import rewards
import shapes
from shapes import data
from shapes.classifier import ShapesClassifier
from conftest import tensor_digest


def _pixels(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy()


def _blobs(image: torch.Tensor, color: str):
    """8-connected components of the pixels of exactly `color`."""
    mask = np.all(_pixels(image) == np.float32(data.COLORS[color]), axis=-1)
    return ndimage.label(mask, structure=np.ones((3, 3)))


def test_rendered_images_match_their_captions():
    """Read the attributes back from the pixels, without the classifier: two colours only, the background's
    at the corners, one 8-connected blob per shape, and the blob's fill of its bounding box tells the shape
    (square ≈ 1, circle ≈ π/4, triangle ≈ 1/2)."""
    rng = np.random.default_rng(123)
    for attrs in data.all_attrs():
        for _ in range(3):
            image = data.render(attrs, rng)
            assert image.shape == (3, 32, 32) and image.dtype == torch.float32
            rgb = {c: tuple(np.float32(data.COLORS[c]).tolist()) for c in (attrs.color, attrs.background)}
            assert {tuple(p) for p in _pixels(image).reshape(-1, 3).tolist()} == set(rgb.values())
            corners = _pixels(image)[[0, 0, -1, -1], [0, -1, 0, -1]].tolist()
            assert all(tuple(p) == rgb[attrs.background] for p in corners)
            labelled, n = _blobs(image, attrs.color)
            assert n == attrs.count, (data.caption(attrs), n)
            for box_slice, index in zip(ndimage.find_objects(labelled), range(1, n + 1)):
                fill = (labelled[box_slice] == index).mean()
                expected = {"square": (0.9, 1.0), "circle": (0.65, 0.9), "triangle": (0.4, 0.65)}[attrs.shape]
                assert expected[0] <= fill <= expected[1], (data.caption(attrs), fill)


def test_captions_parse_back_and_other_prompts_are_rejected():
    combos = data.all_attrs()
    assert len(combos) == len(set(combos)) == 3 * 5 * 4 * 2
    assert [data.parse_caption(data.caption(a)) for a in combos] == combos
    assert data.caption(data.Attrs("triangle", "green", "white", 2)) == "two green triangles on a white background"
    assert data.parse_caption("  A Red Circle on a blue background ") == data.Attrs("circle", "red", "blue", 1)
    for bad in ("a cat", "two red circle on a blue background", "a red circles on a blue background",
                "a red circle on a red background", "a purple circle on a blue background", ""):
        with pytest.raises(ValueError, match="grammar"):
            data.parse_caption(bad)


def test_heldout_prompts_are_the_heldout_pairs_only():
    train, heldout = set(data.TRAIN_PROMPTS), set(data.HELDOUT_PROMPTS)
    assert not train & heldout and len(train | heldout) == 120 and len(heldout) == 24
    pairs = {(a.shape, a.color) for a in map(data.parse_caption, heldout)}
    assert pairs == set(data.HELDOUT_PAIRS)
    assert not pairs & {(a.shape, a.color) for a in map(data.parse_caption, train)}
    assert common.load_prompts("shapes") == data.TRAIN_PROMPTS
    assert common.load_prompts("shapes_heldout") == data.HELDOUT_PROMPTS
    # a script without --prompts trains tiny-shapes on its captions, any other model on DDPO's animals
    assert common.load_prompts(None, None, "tiny-shapes") == data.TRAIN_PROMPTS
    assert common.load_prompts(None, None, "tiny") == common.load_prompts("simple_animals")


def test_sampling_is_deterministic_given_the_seed():
    a, attrs_a = data.sample_batch(16, np.random.default_rng(5))
    b, attrs_b = data.sample_batch(16, np.random.default_rng(5))
    c, _ = data.sample_batch(16, np.random.default_rng(6))
    assert torch.equal(a, b) and attrs_a == attrs_b and not torch.equal(a, c)


@pytest.fixture(scope="module")
def shapes_pipe():
    return common.load_pipeline("tiny-shapes", lora_rank=4)


def test_tiny_shapes_loads_committed_weights_offline(shapes_pipe):
    pipe = shapes_pipe
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and pipe.unet.config.sample_size == 16
    assert common.lora_parameters(pipe) and not any(p.requires_grad for p in pipe.vae.parameters())
    # the VAE's scaling factor gives latents of about unit std on the data
    x, _ = data.sample_batch(64, np.random.default_rng(0))
    with torch.no_grad():
        latents = pipe.vae.encode(x * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
    assert 0.8 < latents.std().item() < 1.25
    images = common.sample_images(pipe, data.TRAIN_PROMPTS[:2], 0, 4, shapes.RECOMMENDED["guidance_scale"])
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


# SHA-256 of the float16 tensors (name, dtype, shape, bytes; sorted by name) of the files tiny-shapes was committed as
# before it became a pipeline folder: shapes/weights/{unet,vae,text_encoder}.safetensors of commit 5fd0f6a.
PRETRAINED_DIGESTS = {
    "unet/diffusion_pytorch_model.safetensors": "e4315a5c97f50eef6c473a60d820c2de7adbd40c2d6c60b9b140a20628d65d36",
    "vae/diffusion_pytorch_model.safetensors": "d26b7d29ba839ac3d428a720afa4a47b015ff80b5471643c30474cf0a4b7fdca",
    "text_encoder/model.safetensors": "a200f1ee02df96f7d24a3c193d2ea718bccafdfaa21433bf6e13464ecc8deb11",
}


def test_tiny_shapes_folder_holds_the_pretrained_weights_bit_for_bit():
    from safetensors.torch import load_file

    for name, digest in PRETRAINED_DIGESTS.items():
        assert tensor_digest(load_file(common.models.TINY_SHAPES / name)) == digest, name


def _built_in_code() -> dict:
    """tiny-shapes as it was built before it became a folder: the configs in code (`tiny`'s UNet and text encoder, the
    VAE at half the channels with the scaling factor `shapes.pretrain` measured) and the folder's weights."""
    from safetensors.torch import load_file

    from common.models import TINY_SHAPES, tiny_text_encoder, tiny_unet, tiny_vae

    report = json.loads((TINY_SHAPES / "pretrain.json").read_text())
    built = dict(unet=tiny_unet(), text_encoder=tiny_text_encoder(),
                 vae=tiny_vae(channels=(16, 32), norm_groups=8, scaling_factor=report["vae"]["scaling_factor"]))
    for name, module in built.items():
        file = next(f for f in PRETRAINED_DIGESTS if f.startswith(name + "/"))
        module.load_state_dict({k: v.float() for k, v in load_file(TINY_SHAPES / file).items()})
        module.eval()
    return built


def test_tiny_shapes_folder_is_the_model_built_in_code():
    """`StableDiffusionPipeline.from_pretrained(folder)`, with no other argument, is float32 and samples exactly the
    images of the model built in code (with the CLIP tokenizer and DDIM on SD1.4's schedule); so does
    `--model tiny-shapes` through `common.load_pipeline`."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from common.models import SD14_SCHEDULER, TINY_SHAPES, clip_tokenizer

    built = _built_in_code()
    reference = StableDiffusionPipeline(**built, tokenizer=clip_tokenizer(), scheduler=DDIMScheduler(**SD14_SCHEDULER),
                                        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = StableDiffusionPipeline.from_pretrained(TINY_SHAPES)
    assert folder.safety_checker is None and type(folder.scheduler) is DDIMScheduler
    for name, module in built.items():
        own = getattr(folder, name).state_dict()
        assert set(own) == set(module.state_dict()), name
        assert all(v.dtype == torch.float32 and torch.equal(v, module.state_dict()[k]) for k, v in own.items()), name
    prompts = [*data.TRAIN_PROMPTS[:3], data.HELDOUT_PROMPTS[0], "Two RED squares, héllo wörld!", ""]
    assert folder.tokenizer(prompts, padding="max_length").input_ids == \
        reference.tokenizer(prompts, padding="max_length").input_ids
    assert folder.tokenizer.model_max_length == 77
    expected = common.sample_images(reference, prompts[:4], 0, 4, shapes.RECOMMENDED["guidance_scale"])
    assert torch.equal(common.sample_images(folder, prompts[:4], 0, 4, shapes.RECOMMENDED["guidance_scale"]), expected)
    loaded = common.load_pipeline("tiny-shapes", lora_rank=0)
    assert torch.equal(common.sample_images(loaded, prompts[:4], 0, 4, shapes.RECOMMENDED["guidance_scale"]), expected)


def test_shapes_pretrain_writes_the_committed_folder(tmp_path):
    """`shapes.pretrain`'s writer, given the modules it trains (built in code), writes the committed files."""
    from shapes import pretrain

    built = _built_in_code()
    pretrain.save_pipeline(built["unet"], built["vae"], built["text_encoder"], tmp_path)
    committed = common.models.TINY_SHAPES
    listing = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert listing(tmp_path) == [f for f in listing(committed) if f != pretrain.REPORT]
    for name in listing(tmp_path):
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), name


@pytest.fixture(scope="module")
def alignment():
    return rewards.load("shapes_alignment").parts["shapes_alignment"]


def test_classifier_reads_fresh_images(alignment):
    images, attrs = data.sample_batch(512, np.random.default_rng(2024))
    with torch.no_grad():
        logits = alignment.classifier(images)
    for name, target in data.labels(attrs).items():
        assert (logits[name].argmax(-1) == target).float().mean() >= 0.97, name


def test_rewards_against_an_independent_computation(alignment):
    exact = rewards.load("shapes_exact_match")
    assert alignment.differentiable and not exact.differentiable
    images, attrs = data.sample_batch(48, np.random.default_rng(7))
    images = (images + 0.3 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    prompts = [data.caption(a) for a in attrs[:24]] + [data.caption(data.all_attrs()[i]) for i in range(24)]
    targets = data.labels([data.parse_caption(p) for p in prompts])
    logits = ShapesClassifier.from_file()(images)
    expected_alignment = -torch.stack([F.cross_entropy(logits[k], targets[k], reduction="none")
                                       for k in targets]).mean(0)
    expected_exact = torch.stack([logits[k].argmax(-1) == targets[k] for k in targets]).all(0).float()
    with torch.no_grad():
        torch.testing.assert_close(alignment(images, prompts), expected_alignment)
    assert torch.equal(exact(images, prompts), expected_exact)
    assert 0 < expected_exact.sum() < len(prompts)  # both outcomes occur: the comparison is not vacuous
    with pytest.raises(ValueError, match="grammar"):
        alignment(images[:1], ["a photo of a cat"])
    with pytest.raises(ValueError, match="grammar"):
        exact(images[:1], ["a photo of a cat"])


def test_alignment_gradient_reaches_the_pixels():
    """Autograd against central finite differences in float64 on a few pixels."""
    from rewards.shapes import ShapesAlignment

    reward = ShapesAlignment(ShapesClassifier.from_file().double())
    images, attrs = data.sample_batch(2, np.random.default_rng(3))
    images = (0.8 * images.double() + 0.1).requires_grad_(True)
    prompts = [data.caption(a) for a in attrs]
    reward(images, prompts).sum().backward()
    assert images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()
    h = 1e-6
    for b, c, y, x in [(0, 0, 5, 5), (0, 1, 16, 16), (1, 2, 10, 20), (1, 0, 30, 2)]:
        delta = torch.zeros_like(images)
        delta[b, c, y, x] = h
        with torch.no_grad():
            fd = (reward(images + delta, prompts).sum() - reward(images - delta, prompts).sum()) / (2 * h)
        torch.testing.assert_close(images.grad[b, c, y, x], fd, rtol=1e-4, atol=1e-9)


def test_missing_classifier_weights_say_how_to_regenerate(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m shapes.train_classifier"):
        ShapesClassifier.from_file(tmp_path / "missing.safetensors")


def test_short_draft_run_raises_shapes_alignment(tmp_path, alignment):
    """DRaFT-1 on tiny-shapes for a few updates; the saved LoRA, evaluated here on fixed prompts and seeds
    independently of the script, scores higher than the base model."""
    import draft

    steps, t, w = 6, 4, shapes.RECOMMENDED["guidance_scale"]
    args = draft.Args(model="tiny-shapes", reward="shapes_alignment", prompts="shapes", steps=steps, batch_size=2,
                      num_inference_steps=t, guidance_scale=w, learning_rate=2e-3, output_dir=str(tmp_path / "run"),
                      num_sample_images=2, sample_every=steps, save_every=0)
    draft.main(args)

    targets = common.ATTENTION_TARGETS + common.FEEDFORWARD_TARGETS
    pipe = common.load_pipeline("tiny-shapes", lora_rank=args.lora_rank, lora_targets=targets)
    prompts = data.TRAIN_PROMPTS[::12]
    with torch.no_grad():
        before = alignment(common.sample_images(pipe, prompts, 1, t, w), prompts).mean()
        common.load_lora(pipe, tmp_path / "run")
        after = alignment(common.sample_images(pipe, prompts, 1, t, w), prompts).mean()
    assert after > before + 0.05, (before, after)
