"""common.evaluation: the sample grid's diversity, its logged values, its seeds and its captioned picture.

References: diversity re-computed in numpy with explicit loops and block averages; the grid's images re-sampled by
diffusers' own StableDiffusionPipeline from the same initial noise, and its rewards re-computed in numpy on those.
"""

import json
import math
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pytest
import torch
import tyro
from diffusers import StableDiffusionPipeline
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import common
from common.evaluation import SampleGrid, captioned_grid, diversity
from common.models import tiny_components
from conftest import assert_normwise_close, float64_scheduler, rounding_tolerance, roundings, script_args

PROMPTS = ["a red circle on a blue background", "two green squares", "an unused third prompt"]


def reference_diversity(images: np.ndarray, group: int, block: int) -> float:
    """Mean over prompts of the mean over seed pairs of the RMS pixel difference, after `block`×`block` averaging."""
    n, c, h, w = images.shape
    small = images.reshape(n, c, h // block, block, w // block, block).mean(axis=(3, 5))
    per_prompt = []
    for p in range(n // group):
        pairs = [np.sqrt(np.mean((small[p * group + i] - small[p * group + j]) ** 2))
                 for i, j in combinations(range(group), 2)]
        per_prompt.append(np.mean(pairs))
    return float(np.mean(per_prompt))


def test_diversity_zero_for_identical_images_and_equal_to_direct_computation():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3 * 4, 3, 128, 128, generator=g)  # 3 prompts × 4 seeds, averaged down to 64×64
    value = diversity(images, 4)
    # float32 against float64: the mean of 3·64·64 squared differences of 2×2 averages (conftest's bound for them;
    # the square root halves it)
    reference = reference_diversity(images.double().numpy(), 4, 2)
    assert value == pytest.approx(reference, rel=rounding_tolerance(3 * 64 * 64 + 8))
    assert value > 0.1
    same = images[::4].repeat_interleave(4, dim=0)  # every prompt's 4 images identical
    assert diversity(same, 4) == 0.0
    # half the prompts collapsed: the mean falls accordingly
    assert diversity(torch.cat([same[:4], images[4:]]), 4) < value
    # an embedding instead of pixels: here the 4×4 corner, exact values (the channels' means would differ between
    # images by about 1% of their size, which float32's rounding of each mean makes an uncertain digit of the result)
    embed = diversity(images, 4, embed_fn=lambda x: x[:, :, :4, :4].flatten(1))
    reference = reference_diversity(images[:, :, :4, :4].double().numpy(), 4, 1)
    assert embed == pytest.approx(reference, rel=rounding_tolerance(3 * 4 * 4 + 8))


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def redness(images, prompts):
    return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))


def contrast(images, prompts):
    return images.flatten(1).std(dim=1)


@dataclass
class Args:
    model: str = "tiny"


def diffusers_images(prompts, seeds, steps):
    """The grid's images drawn by diffusers' pipeline in float64 from the same noise: seed s's generator draws the
    initial latents of all prompts at once; row-major (prompt, seed) order."""
    pipe = StableDiffusionPipeline(**tiny_components(0), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.float64)
    pipe.scheduler = float64_scheduler(pipe.scheduler)
    per_seed = []
    for s in seeds:
        latents = torch.randn(len(prompts), 4, 16, 16, generator=torch.Generator().manual_seed(s)).double()
        per_seed.append(pipe(prompts, latents=latents, num_inference_steps=steps, guidance_scale=7.5, eta=0.0,
                             output_type="pt").images.numpy())  # [P, 3, H, W] in [0, 1]
    return np.stack(per_seed, axis=1).reshape(-1, *per_seed[0].shape[1:])


def test_logged_values_equal_an_independent_computation(tmp_path):
    pipe = common.load_pipeline("tiny", lora_rank=0)
    grid = SampleGrid(PROMPTS, num_images=4, seeds_per_prompt=2, reward_fn=brightness,
                      eval_rewards={"redness": redness, "contrast": contrast}, num_steps=3, guidance_scale=7.5,
                      eta=0.0, reward_name="brightness")
    result = grid(pipe)
    assert result.prompts == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2 and result.seeds == [0, 1, 0, 1]
    logger = common.Logger(tmp_path, Args())
    assert logger.samples(7, result) == pytest.approx(float(result.scores.mean()))
    logger.close()

    ref = diffusers_images(PROMPTS[:2], [0, 1], 3)
    assert ref.dtype == np.float64
    # conftest's float32 bound for the text encoder, 3 guided UNet calls (gain 2w − 1) and the decoder
    n = roundings(pipe.text_encoder) + 3 * roundings(pipe.unet) + roundings(pipe.vae.post_quant_conv, pipe.vae.decoder)
    tolerance = rounding_tolerance(n, gain=2 * 7.5 - 1)
    assert_normwise_close(result.images, torch.from_numpy(ref), tolerance)
    # Each value below is a mean, a difference of means, a standard deviation or a mean of RMS differences of the
    # images' 3·32·32 pixels: Lipschitz in them with a constant below 3/√(3·32·32), so within that times the images'
    # distance from the reference, plus its own rounding (a mean of 3·32·32 float32 terms)
    bound = 3 * tolerance * np.linalg.norm(ref) / math.sqrt(3 * 32 * 32) + rounding_tolerance(3 * 32 * 32 + 8)
    expected = {
        "eval_reward": ref.mean(axis=(1, 2, 3)).mean(),
        "eval/redness": (ref[:, 0].mean(axis=(1, 2)) - ref[:, 1:].mean(axis=(1, 2, 3))).mean(),
        "eval/contrast": np.array([np.std(x.ravel(), ddof=1) for x in ref]).mean(),
        "eval/diversity": reference_diversity(ref, 2, 1),  # 32×32 images: no averaging
    }
    [row] = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert row["step"] == 7 and set(row) == {"step", "scores", *expected}
    assert row["scores"] == pytest.approx(list(ref.mean(axis=(1, 2, 3))), abs=bound)
    for key, value in expected.items():
        assert row[key] == pytest.approx(value, abs=bound), key

    events = EventAccumulator(str(tmp_path)).Reload()
    for key, value in expected.items():
        scalar = events.Scalars("charts/eval_reward" if key == "eval_reward" else key)[0]
        assert scalar.step == 7 and scalar.value == pytest.approx(row[key], rel=1e-6)
    image = events.Images("samples")[0]
    png = Image.open(tmp_path / "samples" / "step_000007.png")
    assert (image.width, image.height) == png.size  # TensorBoard shows the same picture


def test_same_prompt_and_seed_give_the_same_image_across_calls():
    pipe = common.load_pipeline("tiny", lora_rank=0)
    grid = SampleGrid(PROMPTS, num_images=4, seeds_per_prompt=2, num_steps=2, eta=1.0)  # η = 1: noise at every step
    first = grid(pipe).images
    torch.manual_seed(123)  # training draws from the global RNG between two grids
    torch.rand(10)
    again = grid(pipe).images
    assert torch.equal(first, again)
    assert not torch.equal(first[0], first[1])  # the two seeds of a prompt differ


def test_grid_steps_are_eval_num_inference_steps_else_the_training_steps():
    """--eval-num-inference-steps unset: the grid of the training --num-inference-steps, unchanged; set: that many
    sampler steps, the images of `common.sample_images` at that count (same ops, so exactly), with the training η."""
    import grpo

    def grid(*flags):
        args = tyro.cli(grpo.Args, args=script_args("grpo", "--num-inference-steps", "4", "--eta", "0.5",
                                                    "--guidance-scale", "7.5", "--num-sample-images", "4", *flags))
        return SampleGrid.from_args(args, PROMPTS, brightness, {})(pipe).images

    pipe = common.load_pipeline("tiny", lora_rank=0)
    default = grid()
    assert torch.equal(default, grid("--eval-num-inference-steps", "4"))
    two = grid("--eval-num-inference-steps", "2")
    per_seed = [common.sample_images(pipe, PROMPTS[:2], s, 2, 7.5, 0.5) for s in (0, 1)]
    assert torch.equal(two, torch.stack(per_seed, dim=1).flatten(0, 1))
    assert (two - default).abs().max() > 0.01


def find(picture: np.ndarray, image: np.ndarray) -> tuple[int, int]:
    """Where `image` [h, w, 3] appears pixel for pixel in `picture`."""
    h, w = image.shape[:2]
    for y, x in zip(*np.nonzero((picture == image[0, 0]).all(axis=-1))):
        if np.array_equal(picture[y : y + h, x : x + w], image):
            return int(y), int(x)
    raise AssertionError("image not found in the grid")


def test_captioned_grid_enlarges_orders_and_captions():
    g = torch.Generator().manual_seed(1)
    images = (torch.rand(4, 3, 32, 32, generator=g) * 255).round() / 255  # exact 8-bit values
    # nearest-neighbour ×4, computed here with np.repeat: every pixel a 4×4 block
    bigs = [(im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8).repeat(4, axis=0).repeat(4, axis=1)
            for im in images]
    picture = np.asarray(captioned_grid(images, 2, ["first prompt", "second prompt"],
                                        ["seed 0", "seed 1", "seed 0", "seed 1"], "step 3 · mean reward 0.5"))
    blank = np.asarray(captioned_grid(images, 2))
    assert picture.shape[1] == blank.shape[1] == 2 * (128 + 8) and picture.shape[0] > blank.shape[0]
    (y0, x0), (y1, x1), (y2, x2), (y3, x3) = [find(picture, big) for big in bigs]
    assert y0 == y1 < y2 == y3 and x0 == x2 < x1 == x3  # one row per prompt, one column per seed
    dark = picture.min(axis=-1) < 100
    assert dark[:y0].sum() > 200  # the header, the first prompt and the seed labels above the first row
    assert dark[y0 + 128 : y2].sum() > 100  # the second prompt and its labels
    by0, _ = find(blank, bigs[0])
    assert not (blank.min(axis=-1) < 100)[:by0].any()  # without captions nothing is written above the images


# ---------------------------------------------------------------------------------------------- caption fitting
def reference_wrap(draw, text, font, width, max_lines):
    """The captions as first drawn: greedy word wrap over every word, and a cut line trimmed one character at a
    time until it fits with "…" (quadratic in the line's length: 38 s for a 4,000-character prompt)."""
    lines = []
    for word in text.split():
        joined = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(joined, font=font) <= width:
            lines[-1] = joined
        else:
            lines.append(word)
    out = []
    for i, line in enumerate(lines[:max_lines]):
        if draw.textlength(line, font=font) > width or (i == max_lines - 1 and len(lines) > max_lines):
            while line and draw.textlength(line + "…", font=font) > width:
                line = line[:-1]
            line = line.rstrip() + "…"
        out.append(line)
    return out


CAPTIONS = [
    "a cat",
    "an astronaut riding a horse on the moon, trending on artstation, highly detailed, 8k, octane render",
    "supercalifragilisticexpialidocious" * 8,  # one word wider than any line
    "a photo of a " + "verylongwordwithoutspaces" * 10 + " on a table",
    "猫が窓辺で眠っている" * 20,  # no spaces: one word
    "mixed 猫 text with  double  spaces and a tab\there " * 6,
    "ends with spaces before the cut " + "x" * 60,
    "W" * 3,  # wide glyphs
]


@pytest.mark.parametrize("size", [12, 20])
@pytest.mark.parametrize("width", [3, 40, 128, 292, 600])
def test_caption_fitting_matches_the_one_character_at_a_time_reference(size, width):
    from PIL import ImageDraw

    from common.evaluation import _font, _wrap

    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), _font(size)
    for text in CAPTIONS:
        for max_lines in (1, 3):
            assert _wrap(draw, text, font, width, max_lines) == reference_wrap(draw, text, font, width, max_lines), (
                text, width, max_lines)


def counted_textlength(monkeypatch, max_chars: int) -> dict:
    """Replace ImageDraw.textlength with one that counts its calls and the characters it measures; past
    `max_chars` it fails at once, so a quadratic caption fitting ends this test in seconds instead of hours."""
    from PIL import ImageDraw

    original, counts = ImageDraw.ImageDraw.textlength, {"calls": 0, "chars": 0}

    def textlength(draw, text, *args, **kwargs):
        counts["calls"] += 1
        counts["chars"] += len(text)
        assert counts["chars"] <= max_chars, f"measured {counts['chars']} characters in {counts['calls']} calls"
        return original(draw, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "textlength", textlength)
    return counts


@pytest.mark.parametrize("unit", ["x", "猫", "word "])  # one long word, CJK without spaces, many short words
def test_a_long_prompt_is_captioned_with_logarithmically_many_measurements(monkeypatch, unit):
    image = torch.full((1, 3, 32, 32), 0.5)
    counts = {}
    for n in (1_000, 100_000):
        prompt = (unit * n)[:n]
        with monkeypatch.context() as patch:
            measured = counted_textlength(patch, max_chars=3 * n)  # the whole text measured at most 3 times
            picture = captioned_grid(image, 1, [prompt])  # one row caption: the prompt, at most 3 lines
        counts[n] = measured["calls"]
        assert picture.size[0] == 136
    # a text 100 times longer costs at most the doublings and halvings of a 100 times longer cut: O(log n) calls
    assert counts[100_000] <= counts[1_000] + 2 * math.ceil(math.log2(100)) + 2, counts
    assert counts[100_000] <= 60, counts
