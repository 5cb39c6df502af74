"""`--model sd14-random`: SD1.4's real architecture from its shipped configs with random weights.

The expected facts come from outside the code under test: the published parameter counts, the original LDM
config of SD1.x (CompVis/stable-diffusion configs/stable-diffusion/v1-inference.yaml, quoted below), and the
LoRA module names derived from the block structure of the UNet config.
"""

import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
from conftest import ROOT, randomize_lora, read_metrics

# SD1.4's pipeline is 4-5 GB per process: these tests run on one pytest-xdist worker (pytest.ini: --dist loadgroup),
# so that two of them never hold one each at the same time.
pytestmark = pytest.mark.xdist_group("sd14")

CONFIGS = ROOT / "common" / "configs" / "sd14"
ATTENTION_FF = common.ATTENTION_TARGETS + common.FEEDFORWARD_TARGETS

# Published parameter counts: the SD1.x UNet in diffusers' `ModelMixin.num_parameters` docstring; the VAE and
# CLIP ViT-L/14 text encoder as quoted for SD1.x in public code (e.g. DeepSpeed-MII's notes).
PARAMETERS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
# v1-inference.yaml: unet_config, first_stage_config.ddconfig, and the noise schedule
LDM_UNET = dict(model_channels=320, channel_mult=(1, 2, 4, 4), attention_levels=3, num_res_blocks=2, num_heads=8,
                context_dim=768, channels=4)
LDM_VAE = dict(ch=128, ch_mult=(1, 2, 4, 4), z_channels=4, resolution=512, scale_factor=0.18215)
LDM_SCHEDULE = dict(linear_start=0.00085, linear_end=0.0120, timesteps=1000)


def config(component: str) -> dict:
    return json.loads((CONFIGS / component / "config.json").read_text())


def expected_lora_modules(targets) -> set[str]:
    """SD1.4's LoRA module names from the UNet config's block structure: every cross-attention block holds one
    transformer block per resnet (transformer_layers_per_block defaults to 1) with attn1 (self), attn2 (cross) and
    a feed-forward; a down block has layers_per_block resnets, an up block one more, the mid block one."""
    cfg = config("unet")
    n = cfg["layers_per_block"]
    blocks = [f"down_blocks.{i}.attentions.{j}" for i, kind in enumerate(cfg["down_block_types"])
              if kind.startswith("CrossAttn") for j in range(n)]
    blocks += ["mid_block.attentions.0"]
    blocks += [f"up_blocks.{i}.attentions.{j}" for i, kind in enumerate(cfg["up_block_types"])
               if kind.startswith("CrossAttn") for j in range(n + 1)]
    assert len(blocks) == 16  # down 2×3, mid 1, up 3×3
    names = set()
    for block in blocks:
        for target in targets:
            layers = [target] if target.startswith("ff.") else [f"attn1.{target}", f"attn2.{target}"]
            names |= {f"{block}.transformer_blocks.0.{layer}" for layer in layers}
    return names


def lora_file_tensors(path) -> dict:
    """{(module, "A" or "B"): tensor} of a saved LoRA, in either of diffusers' key formats (lora.down/up, lora_A/B)."""
    from safetensors.torch import load_file

    kinds = {".down.weight": "A", ".up.weight": "B", "_A.weight": "A", "_B.weight": "B"}
    tensors = {}
    for key, value in load_file(path).items():
        assert key.startswith("unet."), key
        module, suffix = key.removeprefix("unet.").rsplit(".lora", 1)
        tensors[module, kinds[suffix]] = value
    return tensors


def check_loads_into(pipe, lora_dir, expected_modules) -> None:
    """diffusers' own `load_lora_weights` puts every tensor of the file into the UNet's adapter and nothing else
    (no missing or unexpected keys), with SD1.4's module names."""
    saved = lora_file_tensors(lora_dir / common.LORA_FILE)
    assert {module for module, _ in saved} == expected_modules
    assert len(saved) == 2 * len(expected_modules)
    pipe.load_lora_weights(str(lora_dir), adapter_name="check")
    loaded = {(name.split(".lora_")[0], name.split(".lora_")[1][0]): p
              for name, p in pipe.unet.named_parameters() if ".check." in name}
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(loaded[key].float(), value.float()), key


def plain_sd14():
    """A pipeline built from the same configs without an adapter, for diffusers' loader. Seed 1: a LoRA has to fit
    SD1.4's architecture, not one set of weights. Built where needed and dropped after, so that the tests hold one
    4.3 GB model at a time, and none while a script runs (CI and this machine are shared, 24 GB)."""
    from diffusers import StableDiffusionPipeline

    from common.models import sd14_random_components

    return StableDiffusionPipeline(**sd14_random_components(1), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def test_configs_are_sd14s_architecture():
    """The shipped configs load into diffusers' and transformers' classes and give SD1.4's published sizes
    (built on the meta device: no weights, a fraction of a second)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config("unet"))
        vae = AutoencoderKL.from_config(config("vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(CONFIGS / "text_encoder" / "config.json"))
    for name, module in dict(unet=unet, vae=vae, text_encoder=text_encoder).items():
        assert sum(p.numel() for p in module.parameters()) == PARAMETERS[name], name

    assert list(unet.config.block_out_channels) == [LDM_UNET["model_channels"] * m for m in LDM_UNET["channel_mult"]]
    assert sum(hasattr(b, "attentions") for b in unet.down_blocks) == LDM_UNET["attention_levels"]
    assert all(len(b.resnets) == LDM_UNET["num_res_blocks"] for b in unet.down_blocks)
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert block.attn1.heads == block.attn2.heads == LDM_UNET["num_heads"]
    assert block.attn2.to_k.in_features == LDM_UNET["context_dim"]
    assert unet.conv_in.in_channels == unet.conv_out.out_channels == LDM_UNET["channels"]
    assert unet.config.sample_size * 8 == LDM_VAE["resolution"]  # 64×64 latents of 512 px images

    assert list(vae.config.block_out_channels) == [LDM_VAE["ch"] * m for m in LDM_VAE["ch_mult"]]
    assert vae.config.latent_channels == LDM_VAE["z_channels"] and vae.config.sample_size == LDM_VAE["resolution"]
    assert vae.config.scaling_factor == LDM_VAE["scale_factor"]
    # FrozenCLIPEmbedder is OpenAI CLIP ViT-L/14's text tower, whose sizes open_clip ships
    open_clip_configs = Path(importlib.util.find_spec("open_clip").origin).parent / "model_configs"
    clip = json.loads((open_clip_configs / "ViT-L-14.json").read_text())["text_cfg"]
    layers = [m for m in text_encoder.modules() if type(m).__name__ == "CLIPEncoderLayer"]
    assert len(layers) == clip["layers"]
    assert layers[0].self_attn.embed_dim == clip["width"] and layers[0].self_attn.num_heads == clip["heads"]
    assert layers[0].mlp.fc1.out_features == 4 * clip["width"]
    embeddings = text_encoder.get_input_embeddings().weight.shape, text_encoder.config.max_position_embeddings
    assert embeddings == ((clip["vocab_size"], clip["width"]), clip["context_length"])

    # LDM's "linear" schedule: betas = linspace(√start, √end, T)², written out in float64
    s = LDM_SCHEDULE
    betas = torch.linspace(s["linear_start"] ** 0.5, s["linear_end"] ** 0.5, s["timesteps"], dtype=torch.float64) ** 2
    scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(CONFIGS / "scheduler"))
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-5, atol=0)


def test_random_weights_are_seeded_default_init_in_every_dtype():
    """`random_weights_` draws PyTorch's default Linear/Conv distribution U(±1/√fan_in) per seed, and a half
    precision model is the float32 one rounded (on `tiny`'s UNet, built on the meta device)."""
    from common.models import random_weights_, tiny_unet

    def build(seed, dtype=torch.float32):
        with torch.device("meta"):
            unet = tiny_unet()
        return dict(random_weights_(unet, seed, dtype).named_parameters())

    base = build(0)
    assert all(torch.equal(p, q) for p, q in zip(base.values(), build(0).values()))
    assert not any(torch.equal(p, q) for p, q in zip(base.values(), build(1).values()) if p.dim() >= 2)
    for dtype in (torch.float16, torch.bfloat16):
        for name, p in build(0, dtype).items():
            assert p.dtype == dtype and torch.equal(p, base[name].to(dtype)), name

    with torch.device("meta"):
        modules = dict(tiny_unet().named_modules())
    for name, p in base.items():
        owner = modules[name.rsplit(".", 1)[0]]
        if isinstance(owner, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
        elif p.dim() == 1:
            assert torch.all(p == 0), name
        else:
            bound = 1 / math.sqrt(torch.nn.init._calculate_fan_in_and_fan_out(p)[0])
            assert p.abs().max() <= bound, name
            if p.numel() > 10_000:  # the std of U(±b) is b/√3
                assert abs(p.std().item() / (bound / math.sqrt(3)) - 1) < 0.05, name


def test_load_pipeline_sd14_random_lora(tmp_path):
    """`common.load_pipeline("sd14-random")`: SD1.4's sizes, LoRA on SD1.4's module names (128 attention modules,
    160 with the feed-forward layers), saved so that diffusers' loader takes it and it changes the UNet."""
    saved = {}
    for targets, modules in ((common.ATTENTION_TARGETS, 128), (ATTENTION_FF, 160)):
        pipe = common.load_pipeline("sd14-random", lora_rank=4, lora_targets=targets)
        for name, count in PARAMETERS.items():
            frozen = [p for p in getattr(pipe, name).parameters() if not p.requires_grad]
            assert sum(p.numel() for p in frozen) == count and {p.dtype for p in frozen} == {torch.float32}, name
        trainable = {n: p for n, p in pipe.unet.named_parameters() if p.requires_grad}
        assert {n.split(".lora_")[0] for n in trainable} == expected_lora_modules(targets)
        assert len(expected_lora_modules(targets)) == modules and len(trainable) == 2 * modules
        assert all(p.dtype == torch.float32 for p in trainable.values())
        assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight" in trainable
        randomize_lora(pipe)  # B ≠ 0, so the adapter changes the model
        saved[targets] = tmp_path / "+".join(targets)
        common.save_lora(pipe, saved[targets])
        del pipe, trainable

    plain = plain_sd14()
    x, emb = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 768)
    with torch.no_grad():
        before = plain.unet(x, 500, encoder_hidden_states=emb).sample
    for targets, lora_dir in saved.items():
        check_loads_into(plain, lora_dir, expected_lora_modules(targets))
        with torch.no_grad():
            assert (plain.unet(x, 500, encoder_hidden_states=emb).sample - before).abs().max() > 1e-4, targets
        plain.unload_lora_weights()


RUNS = {  # one RL and one gradient script (of conftest.SCRIPTS: at SD1.4's size a run takes about 40 s), one update
    # each at 64 px (8×8 latents, SD1.4's smallest size)
    "ddpo_sf.py": (common.ATTENTION_TARGETS, ["--reward", "jpeg_compressibility", "--sample-batch-size", "2",
                                              "--train-batch-size", "2"]),
    "draft.py": (ATTENTION_FF, ["--reward", "jpeg_compressibility_diff"]),
}


@pytest.mark.parametrize("script", sorted(RUNS))
def test_one_update_on_sd14_random(script, tmp_path):
    targets, flags = RUNS[script]
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / script), "--model", "sd14-random", "--resolution", "64", "--steps", "1",
           "--num-inference-steps", "2", "--batch-size", "2", "--num-sample-images", "1", "--output-dir", str(run_dir),
           *flags]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=900,
                         cwd=tmp_path)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"LoRA, metrics and sample grids in {run_dir}" in res.stdout
    (row,) = read_metrics(run_dir)
    assert row["step"] == 1 and math.isfinite(row["loss"]) and math.isfinite(row["reward_mean"]), row
    check_loads_into(plain_sd14(), run_dir, expected_lora_modules(targets))


def test_bench_sd14_reads_runs_and_formats_its_table(tmp_path):
    """benchmark/bench_sd14.py on fake results (it is never run here): seconds from metrics.jsonl, peak from the
    wrapper's file, the verdicts against its memory goals (GOAL_GB), and a table whose columns line up."""
    from benchmark import bench_sd14

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(dict(step=i + 1, step_seconds=s)) + "\n"
                                                    for i, s in enumerate([9.0, 2.0, 4.0])))
    (tmp_path / "result.json").write_text(json.dumps(dict(device="cuda", peak_bytes=9.5 * 2**30)))
    run = bench_sd14.read_run(tmp_path, tmp_path / "result.json")
    assert run == dict(seconds=3.0, peak_gb=9.5, device="cuda")  # the first update (warm-up) left out

    rows = [dict(script="ddpo_sf.py", variant="defaults", flags="--reward jpeg_compressibility", wall_s=80.0, **run),
            dict(script="draft.py", variant="micro-1", flags="--train-batch-size 1", wall_s=60.0, seconds=7.25,
                 peak_gb=30.0, device="cuda"),
            dict(script="rwr.py", variant="defaults", flags="", wall_s=50.0, seconds=1.0, peak_gb=30.0,
                 device="cuda"),
            dict(script="refl.py", variant="plain", flags="", wall_s=40.0, seconds=1.0, peak_gb=23.0, device="cpu"),
            dict(script="alignprop.py", variant="plain", flags="", wall_s=40.0, seconds=1.0, peak_gb=25.0,
                 device="cpu"),
            dict(script="draft_lv.py", variant="vae-ckpt", flags="--vae-checkpointing", wall_s=3.0,
                 error="exit 2: unknown flag")]
    assert [bench_sd14.verdict(r) for r in rows] == ["≤ 10 GB goal", "> 24 GB goal", "no goal", "fits 24 GB",
                                                     "over 24 GB", "failed"]

    lines = bench_sd14.format_table(rows).splitlines()
    assert len(lines) == 1 + len(rows) and lines[0].split()[:4] == ["script", "variant", "s/update", "peak"]
    seconds, verdicts = lines[0].index("s/update"), lines[0].index("verdict")  # columns line up under the header
    assert [line[seconds:].split()[0] for line in lines] == ["s/update", "3.00", "7.25", "1.00", "1.00", "1.00", "-"]
    assert all(line[verdicts:].startswith(bench_sd14.verdict(r)) for line, r in zip(lines[1:], rows))
    assert lines[1].split()[:4] == ["ddpo_sf.py", "defaults", "3.00", "9.50"]
    assert lines[2].split()[:4] == ["draft.py", "micro-1", "7.25", "30.00"]
    assert lines[-1].split()[:4] == ["draft_lv.py", "vae-ckpt", "-", "-"] and lines[-1].endswith("unknown flag")

    markdown = bench_sd14.format_table(rows, markdown=True).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in markdown]
    assert cells[0][:3] == ["script", "variant", "s/update"] and set(markdown[1]) <= set("|-")
    assert all(len(c) == 7 for c in cells) and cells[3][2:5] == ["7.25", "30.00", "> 24 GB goal"]
    assert cells[3][6] == "`--train-batch-size 1`"


@pytest.mark.parametrize("rl_batch", ["16", "8"])  # a CPU run's; gpu_check.py's (one sampling chunk)
def test_bench_sd14_cpu_reductions_keep_the_scripts_batch_rules(rl_batch):
    """The smaller RL batch of a CPU run still divides into the scripts' sample batches, minibatches and train
    batches (their Args defaults), holds GRPO's groups and RWR's images per prompt, and ReFL's window fits in a short
    schedule: each script's own checks accept the command line."""
    import tyro

    from benchmark import bench_sd14

    opts = bench_sd14.parse_args(["--rl-batch-size", rl_batch, "--num-inference-steps", "2"])
    for script in bench_sd14.RL_SCRIPTS + bench_sd14.GRADIENT_SCRIPTS:
        module = importlib.import_module(script.removesuffix(".py"))
        defaults = module.Args()
        for variant in ["defaults"] if script in bench_sd14.RL_SCRIPTS else bench_sd14.VARIANTS:
            flags = bench_sd14.script_flags(script, variant, opts)
            tyro.cli(module.Args, args=bench_sd14.shared_flags(opts) + flags)  # raises UserError where one is off
            value = dict(zip(flags[::2], flags[1::2]))
            if script in bench_sd14.RL_SCRIPTS:
                batch = int(value["--batch-size"])
                minibatch = batch // int(value.get("--num-minibatches", 1))
                assert batch % defaults.sample_batch_size == 0 and minibatch % defaults.train_batch_size == 0
            else:
                assert value["--train-batch-size"] in ("1", str(defaults.batch_size))
            if script == "refl.py":
                assert int(value["--max-step"]) <= 2
