"""SDXL (common/sdxl.py) on `tiny-sdxl`: the conditioning against StableDiffusionXLPipeline.encode_prompt, the sampler
against the pipeline's own sampling loop, the DDIM step on SDXL's schedule, the fp16 VAE, every script and
lora_tools.py, and the kohya export against ComfyUI's SDXL key map."""

import copy
import importlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import common
from common.models import SDXL_CONFIGS, _sdxl_pipeline, tiny_sdxl_components
from conftest import (ROOT, SCRIPTS, assert_normwise_close, float64_scheduler, randomize_lora, read_metrics,
                      rounding_tolerance, roundings, script_args, script_cli, scripts)

TINY = ["--model", "tiny-sdxl"]


@pytest.fixture
def sdxl_pipe():
    return common.load_pipeline("tiny-sdxl", lora_rank=4)


def plain_pipeline(seed=0):
    """A StableDiffusionXLPipeline of the tiny-sdxl modules, without any adapter."""
    pipe = _sdxl_pipeline(*tiny_sdxl_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_out(pipe):
    """The UNet called directly with SDXL's added conditions (random inputs), not through common."""
    g = torch.Generator().manual_seed(0)
    x, emb, pooled = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 64, generator=g), torch.randn(2, 32,
                                                                                                             generator=g)
    ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([801, 21]), encoder_hidden_states=emb,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample


# --------------------------------------------------------------------------------------------- conditioning


def test_encode_prompts_is_the_pipelines_encode_prompt(sdxl_pipe):
    """Both encoders' penultimate states side by side, the pooled embedding in the last row, zeros for the empty
    prompt (force_zeros_for_empty_prompt): exactly the parts `encode_prompt` returns, the same operations on the same
    batch."""
    prompts = ["a cat riding a bike", "an ant playing chess"]
    assert sdxl_pipe.tokenizer_2.pad_token == "!" and sdxl_pipe.tokenizer_2.pad_token_id == 0
    assert sdxl_pipe.tokenizer.pad_token_id == 49407
    ours = common.encode_prompts(sdxl_pipe, prompts)
    embeds, negative, pooled, negative_pooled = sdxl_pipe.encode_prompt(prompts, device="cpu",
                                                                        do_classifier_free_guidance=True)
    assert ours.shape == (2, 78, 64) and pooled.shape == (2, 32)
    torch.testing.assert_close(ours[:, :77], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours[:, 77, :32], pooled, rtol=0, atol=0)
    assert not ours[:, 77, 32:].any()
    uncond = common.encode_prompts(sdxl_pipe, ["", ""])
    assert not negative.any() and not negative_pooled.any() and not uncond.any()

    # without force_zeros, "" is encoded like any prompt, as the pipeline encodes negative_prompt=""
    sdxl_pipe.register_to_config(force_zeros_for_empty_prompt=False)
    embeds, negative, pooled, negative_pooled = sdxl_pipe.encode_prompt(prompts, device="cpu", negative_prompt=["", ""],
                                                                        do_classifier_free_guidance=True)
    uncond = common.encode_prompts(sdxl_pipe, ["", ""])
    torch.testing.assert_close(uncond[:, :77], negative, rtol=0, atol=0)
    torch.testing.assert_close(uncond[:, 77, :32], negative_pooled, rtol=0, atol=0)


def test_predict_passes_the_pipelines_added_conditions(sdxl_pipe):
    """time_ids (H, W, 0, 0, H, W) in pixels of the latents' size, the pooled row as text_embeds, at any resolution."""
    calls = []
    unet = sdxl_pipe.unet
    original = unet.forward
    unet.forward = lambda *a, **k: calls.append(k) or original(*a, **k)
    emb = common.encode_prompts(sdxl_pipe, ["a cat"])
    for side in (16, 8):
        common.guided_noise_pred(sdxl_pipe, torch.randn(1, 4, side, side), 500, emb, torch.zeros_like(emb), 2.0)
        added = calls[-1]["added_cond_kwargs"]
        px = side * 2  # tiny-sdxl's VAE factor
        torch.testing.assert_close(added["time_ids"], torch.tensor([[px, px, 0, 0, px, px]] * 2, dtype=torch.float32))
        torch.testing.assert_close(added["text_embeds"][1], emb[0, 77, :32], rtol=0, atol=0)
        assert calls[-1]["encoder_hidden_states"].shape == (2, 77, 64)


# --------------------------------------------------------------------------------------------- sampler, step


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_sampler_reproduces_stable_diffusion_xl_pipeline(sdxl_pipe, tmp_path, guidance):
    """common.sample_trajectory + decode (float32) against StableDiffusionXLPipeline with DDIM, η = 0, the same
    initial latents and the same LoRA (float64), within conftest's float32 rounding bound."""
    randomize_lora(sdxl_pipe)
    common.save_lora(sdxl_pipe, tmp_path)
    reference = plain_pipeline()
    reference.load_lora_weights(str(tmp_path))
    reference.to(torch.float64)
    reference.scheduler = float64_scheduler(reference.scheduler)
    prompts = ["a cat riding a bike", "an ant playing chess"]
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    steps = 6
    expected = reference(prompts, latents=latents.double(), num_inference_steps=steps, guidance_scale=guidance,
                         eta=0.0, output_type="pt").images
    cond, uncond = common.encode_prompts(sdxl_pipe, prompts), common.encode_prompts(sdxl_pipe, [""])
    traj = common.sample_trajectory(sdxl_pipe, cond, uncond, steps, guidance, eta=0.0, latents=latents)
    ours = common.decode(sdxl_pipe, traj.latents[:, -1])
    assert ours.shape == expected.shape == (2, 3, 32, 32) and expected.dtype == torch.float64
    assert (ours - 0.5).abs().max() > 0.05  # not a blank image
    n = (roundings(sdxl_pipe.text_encoder, sdxl_pipe.text_encoder_2) + steps * roundings(sdxl_pipe.unet)
         + roundings(sdxl_pipe.vae.decoder))
    assert_normwise_close(ours, expected, rounding_tolerance(n, gain=2 * guidance - 1))


@pytest.mark.parametrize("t", [981, 501, 1])
def test_step_and_log_prob_on_sdxls_schedule(sdxl_pipe, t):
    """DDIM from SDXL-base's scheduler config (timestep_spacing "leading", steps_offset 1): the step is
    DDIMScheduler.step's, and log p is the density of N(μ, σ²) with μ and σ read off diffusers' step (noise 0 and 1),
    all in float64."""
    scheduler = float64_scheduler(sdxl_pipe.scheduler)
    shipped = json.loads((SDXL_CONFIGS / "scheduler" / "scheduler_config.json").read_text())
    for key in ("timestep_spacing", "steps_offset", "beta_start", "beta_end", "beta_schedule", "set_alpha_to_one"):
        assert scheduler.config[key] == shipped[key], key
    scheduler.set_timesteps(50)
    assert scheduler.timesteps[0] == 981 and scheduler.timesteps[-1] == 1  # leading spacing, offset 1
    g = torch.Generator().manual_seed(t)
    x, eps, z = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    prev = scheduler.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
    mean = scheduler.step(eps, t, x, eta=1.0, variance_noise=torch.zeros_like(z)).prev_sample
    std = scheduler.step(eps, t, x, eta=1.0, variance_noise=torch.ones_like(z)).prev_sample - mean
    ours_prev, log_prob = common.step_with_logprob(scheduler, eps, t, x, 1.0, prev_sample=prev)
    expected = torch.distributions.Normal(mean, std).log_prob(prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, expected, rtol=1e-9, atol=1e-9)
    g1 = torch.Generator().manual_seed(7)
    drawn, _ = common.step_with_logprob(scheduler, eps, t, x, 1.0, generator=g1)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).double()
    torch.testing.assert_close(drawn, scheduler.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample, rtol=1e-12,
                               atol=1e-12)


def test_fp16_vae_decodes_in_float32(tmp_path):
    """fp16 weights and SDXL's force_upcast: decode runs the VAE in float32 (finite images, equal to a float32 copy of
    the same fp16 weights), as StableDiffusionXLPipeline does; SD1's pipeline does not upcast, nor does decode."""
    pipe = common.load_pipeline("tiny-sdxl", lora_rank=0, dtype=torch.float16)
    assert pipe.vae.config.force_upcast and pipe.vae.dtype == torch.float16
    reference_vae = copy.deepcopy(pipe.vae).float()
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    images = common.decode(pipe, latents)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    with torch.no_grad():
        expected = (reference_vae.decode(latents / reference_vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
    mean, std = common.encode(pipe, images)
    assert mean.dtype == torch.float32 and torch.isfinite(mean).all() and torch.isfinite(std).all()
    sd = common.load_pipeline("tiny", lora_rank=0, dtype=torch.float16)
    common.decode(sd, latents)
    assert sd.vae.dtype == torch.float16


# --------------------------------------------------------------------------------------------- loading


def test_local_sdxl_folder_loads_as_sdxl(tmp_path):
    """A folder of SDXL's layout loads as StableDiffusionXLPipeline (model_index.json's class) with DDIM on its own
    schedule; a pipeline class of another family is refused in one line before its weights load."""
    tiny = common.load_pipeline("tiny-sdxl", lora_rank=0)
    tiny.save_pretrained(tmp_path / "sdxl")
    pipe = common.load_pipeline(str(tmp_path / "sdxl"), lora_rank=4)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.timestep_spacing == "leading" and pipe.tokenizer_2.pad_token == "!"
    images = [common.sample_images(p, ["a cat", "a dog"], 0, 3, 5.0) for p in (tiny, pipe)]
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=0)
    index = tmp_path / "sdxl" / "model_index.json"
    index.write_text(index.read_text().replace("StableDiffusionXLPipeline", "FluxPipeline"))
    with pytest.raises(common.UserError, match="FluxPipeline is not a model family"):
        common.load_pipeline(str(tmp_path / "sdxl"))


def test_model_names_listed():
    with pytest.raises(common.UserError) as info:
        common.load_pipeline("sdxl-rnd")
    assert "tiny-sdxl" in str(info.value) and "sdxl-random" in str(info.value)


# --------------------------------------------------------------------------------------------- scripts, LoRA


def check_lora_changes_sdxl(run_dir):
    """The run's LoRA loads with StableDiffusionXLPipeline.load_lora_weights into a pipeline of the same modules and
    changes its UNet."""
    pipe = plain_pipeline()
    before = unet_out(pipe)
    pipe.load_lora_weights(str(run_dir))
    assert (unet_out(pipe) - before).abs().max() > 1e-6


@pytest.mark.parametrize("name", scripts())
def test_every_script_updates_tiny_sdxl(name, tmp_path):
    """One update (one sampled batch) of every script on tiny-sdxl through its Args parser and main, unchanged."""
    module = importlib.import_module(name)
    out = tmp_path / "run"
    u = SCRIPTS[name].updates_per_batch
    args = common.cli(module.Args, args=script_args(name, *TINY, "--steps", str(u), "--num-inference-steps", "3",
                                                    "--output-dir", str(out), "--num-sample-images", "2",
                                                    "--sample-every", "100", "--save-every", "0"))
    module.main(args)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, u + 1)) and all(math.isfinite(r["loss"]) for r in rows)
    assert (out / common.LORA_FILE).is_file() and (out / common.KOHYA_FILE).is_file()


@pytest.mark.parametrize("name", ["ddpo_sf", "draft"])
def test_cli_run_on_tiny_sdxl_saves_a_lora_sdxl_loads(name, tmp_path):
    """The CLI of one RL and one gradient script: exit 0, no traceback, and the saved LoRA loads in diffusers' SDXL
    pipeline and changes its output; the kohya copy names SDXL's SGM blocks and says sdxl."""
    out = tmp_path / "run"
    res = subprocess.run(script_cli(name, *TINY, "--steps", "1", "--num-inference-steps", "2", "--output-dir", str(out),
                                    "--num-sample-images", "1", "--learning-rate", "0.01"),
                         capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                         timeout=600)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    check_lora_changes_sdxl(out)
    with safe_open(str(out / common.KOHYA_FILE), framework="pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
        assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
                   for k in f.keys())


def test_lora_tools_on_tiny_sdxl(sdxl_pipe, tmp_path):
    """scale, mix, grid and export (kohya, peft) of lora_tools.py with --model tiny-sdxl."""
    import lora_tools

    randomize_lora(sdxl_pipe)
    common.save_lora(sdxl_pipe, tmp_path / "a")
    lora_tools.main(["scale", str(tmp_path / "a"), "--scale", "0.5", "--output", str(tmp_path / "half"), *TINY])
    lora_tools.main(["mix", f"{tmp_path / 'a'}:1", f"{tmp_path / 'half'}:-2", "--output", str(tmp_path / "zero"),
                     *TINY])
    lora_tools.main(["grid", str(tmp_path / "a"), "--scales", "0,1", "--seeds", "0", "--num-prompts", "1",
                     "--num-inference-steps", "2", "--output", str(tmp_path / "grid.png"), *TINY])
    lora_tools.main(["export", str(tmp_path / "a"), "--output", str(tmp_path / "k.safetensors"), *TINY])
    lora_tools.main(["export", str(tmp_path / "a"), "--format", "peft", "--output", str(tmp_path / "peft"), *TINY])
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "peft" / "adapter_config.json").is_file()
    from common.lora import read_lora

    delta = {name: {m: b.double() @ a.double() for m, (a, b) in read_lora(tmp_path / name).items()}
             for name in ("a", "half", "zero")}
    for m, d in delta["a"].items():
        torch.testing.assert_close(delta["half"][m], d / 2, rtol=1e-6, atol=0)
        assert delta["zero"][m].norm() <= 1e-6 * d.norm()  # 1·ΔW − 2·(ΔW/2), float32 factors
    base = unet_out(plain_pipeline())
    for lora in (tmp_path / "a", tmp_path / "half"):  # both load in diffusers' SDXL pipeline and change its UNet
        pipe = plain_pipeline()
        pipe.load_lora_weights(str(lora))
        assert (unet_out(pipe) - base).abs().max() > 1e-6


# --------------------------------------------------------------------------------------------- kohya / ComfyUI

# An independent transcription of ComfyUI's key map (comfyanonymous/ComfyUI, comfy/utils.py `unet_to_diffusers` and
# comfy/lora.py `model_lora_keys_unet`), restricted to the LoRA-able linear layers of the transformer blocks. ComfyUI
# describes a UNet in SGM terms: num_res_blocks per level, transformer_depth per input resnet, transformer_depth_output
# per output resnet, transformer_depth_middle.
COMFY_TRANSFORMER_BLOCKS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                            "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


def comfy_unet_config(unet) -> dict:
    """The SGM description ComfyUI detects for a diffusers UNet config (comfy/model_detection.py's fields)."""
    cfg = unet.config
    depth = cfg.transformer_layers_per_block
    depth = list(depth) if isinstance(depth, (list, tuple)) else [depth] * len(cfg.down_block_types)
    attn = [int("CrossAttn" in t) * d for t, d in zip(cfg.down_block_types, depth)]
    res = [cfg.layers_per_block] * len(cfg.down_block_types)
    return dict(num_res_blocks=res, channel_mult=list(range(len(res))),
                transformer_depth=[d for d, r in zip(attn, res) for _ in range(r)],
                transformer_depth_output=[d for d, r in zip(attn, res) for _ in range(r + 1)],
                transformer_depth_middle=depth[-1])


def comfy_unet_to_diffusers(unet_config: dict) -> dict:
    """{diffusers weight: SGM weight} for the transformer blocks, as comfy.utils.unet_to_diffusers builds it."""
    num_res_blocks = unet_config["num_res_blocks"]
    depth, depth_out = list(unet_config["transformer_depth"]), list(unet_config["transformer_depth_output"])
    out = {}
    for x in range(len(unet_config["channel_mult"])):
        n = 1 + (num_res_blocks[x] + 1) * x
        for i in range(num_res_blocks[x]):
            for t in range(depth.pop(0)):
                for b in COMFY_TRANSFORMER_BLOCKS:
                    out[f"down_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}.weight"] = \
                        f"input_blocks.{n}.1.transformer_blocks.{t}.{b}.weight"
            n += 1
    for t in range(unet_config["transformer_depth_middle"]):
        for b in COMFY_TRANSFORMER_BLOCKS:
            out[f"mid_block.attentions.0.transformer_blocks.{t}.{b}.weight"] = \
                f"middle_block.1.transformer_blocks.{t}.{b}.weight"
    reversed_res = list(reversed(num_res_blocks))
    for x in range(len(unet_config["channel_mult"])):
        n = (reversed_res[x] + 1) * x
        for i in range(reversed_res[x] + 1):
            for t in range(depth_out.pop()):
                for b in COMFY_TRANSFORMER_BLOCKS:
                    out[f"up_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}.weight"] = \
                        f"output_blocks.{n}.1.transformer_blocks.{t}.{b}.weight"
            n += 1
    return out


def comfy_sgm_lora_keys(unet) -> dict:
    """ComfyUI's `lora_unet_<SGM name with _>` → diffusers module, for the model's own (SGM) state-dict keys: the
    names kohya's sd-scripts and AUTOMATIC1111 use for SDXL."""
    return {"lora_unet_" + sgm[: -len(".weight")].replace(".", "_"): diffusers[: -len(".weight")]
            for diffusers, sgm in comfy_unet_to_diffusers(comfy_unet_config(unet)).items()}


def test_sdxl_random_configs_are_sdxl_bases_sizes():
    """The shipped configs give SDXL-base's published parameter counts (built on the meta device: no memory)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_CONFIGS / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SDXL_CONFIGS / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(SDXL_CONFIGS / "text_encoder" / "config.json"))
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig.from_json_file(SDXL_CONFIGS / "text_encoder_2" / "config.json"))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text_encoder, text_encoder_2)]
    assert counts == [2_567_463_684, 83_653_863, 123_060_480, 694_659_840]
    assert type(text_encoder_2).__name__ == "CLIPTextModelWithProjection" and text_encoder_2.config.projection_dim == 1280
    assert unet.config.cross_attention_dim == 768 + 1280 and vae.config.force_upcast


def test_comfy_config_of_sdxl_base():
    """The SGM description above, for the shipped SDXL-base config, is the one ComfyUI's supported_models.SDXL states."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_CONFIGS / "unet"))
    cfg = comfy_unet_config(unet)
    assert cfg["transformer_depth"] == [0, 0, 2, 2, 10, 10] and cfg["transformer_depth_middle"] == 10
    assert cfg["transformer_depth_output"] == [0, 0, 0, 2, 2, 2, 10, 10, 10] and cfg["num_res_blocks"] == [2, 2, 2]
    keys = comfy_sgm_lora_keys(unet)
    modules = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and "transformer_blocks" in n}
    assert set(keys.values()) == modules  # the map covers every transformer-block linear layer, once
    assert keys["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == \
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.mark.parametrize("targets", [common.ATTENTION_TARGETS, common.ATTENTION_TARGETS + common.FEEDFORWARD_TARGETS])
def test_kohya_export_matches_comfyuis_sdxl_key_map(tmp_path, targets):
    """Every key of the kohya export is one ComfyUI maps onto the SDXL UNet by its SGM name, onto the module the LoRA
    trained, with the LoRA's factors; and diffusers' loader, given the kohya file, reproduces the LoRA's output."""
    from common.lora import read_lora, write_kohya

    pipe = common.load_pipeline("tiny-sdxl", lora_rank=4, lora_targets=targets)
    randomize_lora(pipe)
    common.save_lora(pipe, tmp_path / "lora")
    layers = read_lora(tmp_path / "lora")
    path = write_kohya(layers, tmp_path / "k.safetensors", pipe, title="k")
    kohya = load_file(str(path))
    comfy = comfy_sgm_lora_keys(pipe.unet)
    mapped = {}
    for key, value in kohya.items():
        module, _, kind = key.partition(".")
        assert module in comfy, key
        mapped.setdefault(comfy[module], {})[kind] = value
    assert mapped.keys() == layers.keys()
    for m, (a, b) in layers.items():
        torch.testing.assert_close(mapped[m]["lora_down.weight"], a, rtol=0, atol=0)
        torch.testing.assert_close(mapped[m]["lora_up.weight"], b, rtol=0, atol=0)
        assert mapped[m]["alpha"].item() == a.shape[0]
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["modelspec.architecture"].startswith(
        "stable-diffusion-xl-v1-base")

    ours, theirs = plain_pipeline(), plain_pipeline()
    ours.load_lora_weights(str(tmp_path / "lora"))
    theirs.load_lora_weights(str(tmp_path), weight_name="k.safetensors")
    n = roundings(ours.unet)
    assert_normwise_close(unet_out(theirs), unet_out(ours), rounding_tolerance(n))
    assert (unet_out(ours) - unet_out(plain_pipeline())).abs().max() > 1e-6


# --------------------------------------------------------------------------------------------- the real size


@pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1", reason="SDXL-base's size (3.5 B parameters): RUN_SLOW=1")
@pytest.mark.parametrize("name", ["ddpo_sf", "draft"])
def test_one_update_on_sdxl_random(name, tmp_path):
    """One update at 128 px in bf16 (13.9 GB of float32 weights do not fit the 24 GB machine beside a run)."""
    out = tmp_path / "run"
    flags = ["--sample-batch-size", "2", "--train-batch-size", "2"] if SCRIPTS[name].kind == "rl" else []
    cmd = [sys.executable, str(ROOT / f"{name}.py"), "--model", "sdxl-random", "--resolution", "128",
           "--mixed-precision", "bf16", "--steps", "1", "--num-inference-steps", "2", "--batch-size", "2",
           "--num-sample-images", "1", "--output-dir", str(out), "--reward", SCRIPTS[name].reward, *flags]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=3600,
                         cwd=tmp_path)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    (row,) = read_metrics(out)
    assert math.isfinite(row["loss"]) and math.isfinite(row["reward_mean"])
