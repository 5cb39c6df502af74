"""lora_tools.py (scale, mix, grid, export) against diffusers' own LoRA loading on the tiny model.

Two LoRAs as the scripts save them: rank 2 on attention only, rank 4 on attention + feed-forward, so `mix` has to
concatenate ranks on some modules and not on others. The reference for every output is diffusers itself:
`load_lora_weights` + `set_adapters` on a pipeline built by diffusers from the tiny components, never lora_tools'
own factors.
"""

import functools
import subprocess
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import common
import lora_tools
from common.evaluation import MIN_CELL, PAD
from common.models import tiny_components
from conftest import ROOT, pair_tolerance, randomize_lora, rounding_tolerance, roundings


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """(attention rank 2, attention + FF rank 4): a LoRA folder and a run directory with a checkpoint."""
    root = tmp_path_factory.mktemp("loras")
    attn = common.load_pipeline("tiny", lora_rank=2, lora_targets=common.ATTENTION_TARGETS)
    randomize_lora(attn, std=0.1, seed=1)
    common.save_lora(attn, root / "attn")
    both = common.load_pipeline("tiny", lora_rank=4, lora_targets=common.ATTENTION_TARGETS + common.FEEDFORWARD_TARGETS)
    randomize_lora(both, std=0.1, seed=2)
    common.save_lora(both, root / "run" / "checkpoints" / "step_3")  # a run still training: only its checkpoint
    return root / "attn", root / "run" / "checkpoints" / "step_3"


@functools.cache
def reference_pipe():
    return StableDiffusionPipeline(**tiny_components(0), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def unet_output(adapters=(), weights=None):
    """The UNet output on a fixed input of a diffusers-built tiny pipeline with these LoRA folders or files loaded
    (adapter names a0, a1, …) and `set_adapters(weights)`; the adapters are unloaded again afterwards."""
    pipe = reference_pipe()
    for i, path in enumerate(adapters):
        folder, name = (path.parent, path.name) if path.is_file() else (path, common.LORA_FILE)
        pipe.load_lora_weights(str(folder), weight_name=name, adapter_name=f"a{i}")
    if weights is not None:
        pipe.set_adapters([f"a{i}" for i in range(len(adapters))], weights)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        out = pipe.unet(x, 500, encoder_hidden_states=text).sample
    UNET_ROUNDINGS.append(roundings(pipe.unet))  # with its adapters: their products count too
    pipe.unload_lora_weights()
    return out


UNET_ROUNDINGS = []


def close(a, b):
    """The same weights reached by two routes (merged or separate adapters, scaled factors or scaled outputs): one
    float32 UNet call each, so within twice conftest's bound of each other (normwise), whatever their layouts."""
    return float((a - b).norm()) <= pair_tolerance(rounding_tolerance(max(UNET_ROUNDINGS))) * float(b.norm())


def test_mix_equals_diffusers_weighted_adapters(loras, tmp_path):
    attn, both = loras
    lora_tools.main(["mix", f"{attn}:1.0", f"{both}:0.5", "--model", "tiny", "--output", str(tmp_path / "mix")])
    mixed = unet_output([tmp_path / "mix"])
    assert close(mixed, unet_output([attn, both], [1.0, 0.5]))
    assert not close(mixed, unet_output([attn, both], [1.0, 1.0]))  # the weights matter: the test can fail
    # exact by concatenation: rank 2 + 4 where both adapt a module, 4 on the feed-forward layers only `both` adapts
    # (diffusers' converter writes lora.down for attention layers and leaves peft's lora_A on the feed-forward ones)
    ranks = {k: v.shape[0] for k, v in load_file(tmp_path / "mix" / common.LORA_FILE).items()
             if k.endswith((".lora.down.weight", ".lora_A.weight"))}
    assert len(ranks) == 40  # 4 transformer blocks (down, mid, 2 up) × (8 attention + 2 feed-forward layers)
    assert {r for k, r in ranks.items() if ".ff." in k} == {4}
    assert {r for k, r in ranks.items() if ".ff." not in k} == {6}


def test_scale_matches_base_lora_and_set_adapters(loras, tmp_path):
    _, both = loras
    outputs = {}
    for s in (0.0, 0.5, 1.0, 2.0):
        lora_tools.main(["scale", str(both), "--scale", str(s), "--model", "tiny", "--output", str(tmp_path / str(s))])
        outputs[s] = unet_output([tmp_path / str(s)])  # each output loads with load_lora_weights
    assert close(outputs[0.0], unet_output())  # the base model
    assert close(outputs[1.0], unet_output([both]))  # the LoRA itself
    assert close(outputs[0.5], unet_output([both], [0.5]))
    assert close(outputs[2.0], unet_output([both], [2.0]))  # extrapolation
    assert not close(outputs[0.0], outputs[1.0])


def test_export_kohya_loads_in_diffusers(loras, tmp_path):
    attn, both = loras
    lora_tools.main(["mix", str(attn), f"{both}:-0.7", "--model", "tiny", "--output", str(tmp_path / "mix")])
    out = tmp_path / "mix_kohya.safetensors"
    lora_tools.main(["export", str(tmp_path / "mix"), "--format", "kohya", "--model", "tiny", "--output", str(out)])
    state = load_file(out)
    assert all(k.startswith("lora_unet_") for k in state)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert state[f"{q}.lora_down.weight"].shape[0] == 6 and float(state[f"{q}.alpha"]) == 6.0  # alpha = rank: scale 1
    # diffusers detects the kohya keys and converts them back: the same UNet as the diffusers-format mix
    assert close(unet_output([out]), unet_output([attn, both], [1.0, -0.7]))
    # the metadata the web UIs read, as kohya's sd-scripts write it: ranks 6 (attention) and 4 (feed-forward) are
    # per-module ranks, "Dynamic" in sd-scripts' resize_lora.py; an SD1-shaped UNet (768-wide text in SD1.4, 32 here)
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_dim"] == metadata["ss_network_alpha"] == "Dynamic"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.title"] == "mix_kohya" and metadata["modelspec.resolution"] == "32x32"
    lora_tools.main(["export", str(attn), "--model", "tiny", "--output", str(tmp_path / "attn.safetensors")])
    with safe_open(str(tmp_path / "attn.safetensors"), framework="pt") as f:
        assert (f.metadata()["ss_network_dim"], f.metadata()["ss_network_alpha"]) == ("2", "2.0")  # one rank: scale 1


def test_export_peft_loads_with_peft_model(loras, tmp_path):
    """`PeftModel.from_pretrained(unet, folder)` on a diffusers UNet gives the UNet that `load_lora_weights` gives for
    the LoRA in diffusers' format: one rank (attention, rank 2) and per-module ranks (a mix: 6 on attention, 4 on the
    feed-forward layers, through peft's rank_pattern). Both sides are peft LoRA layers with the same float32 factors
    and scale alpha / rank = 1 exactly, computing the same operations: equal to the bit."""
    from peft import PeftModel

    attn, both = loras
    lora_tools.main(["mix", str(attn), f"{both}:-0.7", "--model", "tiny", "--output", str(tmp_path / "mix")])
    for source in (attn, tmp_path / "mix"):
        out = tmp_path / f"{source.name}_peft"
        lora_tools.main(["export", str(source), "--format", "peft", "--model", "tiny", "--output", str(out)])
        assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        model = PeftModel.from_pretrained(tiny_components(0)["unet"], str(out))
        g = torch.Generator().manual_seed(0)
        x, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
        with torch.no_grad():
            adapted = model(x, 500, encoder_hidden_states=text).sample
        assert torch.equal(adapted, unet_output([source]))
        assert not torch.equal(adapted, unet_output())  # the adapter changes the UNet: the test can fail


def test_grid_png(loras, tmp_path):
    attn, _ = loras
    out = tmp_path / "grid.png"
    lora_tools.main(["grid", str(attn), "--model", "tiny", "--prompts", "simple_animals", "--num-prompts", "2",
                     "--seeds", "0", "--scales", "0,1,2", "--num-inference-steps", "2", "--output", str(out)])
    width, height = Image.open(out).size
    assert width == 3 * (MIN_CELL + 2 * PAD)  # three scales; the 32-pixel images enlarged to 128
    assert height > 2 * (MIN_CELL + 2 * PAD)  # two rows (prompts) and their captions


def refusal(capsys, argv):
    with pytest.raises(SystemExit) as e:
        lora_tools.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and ": error: " in err, err  # one line (program name aside)
    return err


def test_refusals(loras, tmp_path, capsys):
    attn, both = loras
    out = ["--model", "tiny", "--output", str(tmp_path / "out")]
    assert "no such file or folder" in refusal(capsys, ["scale", str(tmp_path / "missing"), "--scale", "1"] + out)
    err = refusal(capsys, ["scale", str(both.parents[1]), "--scale", "1"] + out)  # the run dir has no final LoRA
    assert "holds no pytorch_lora_weights.safetensors" in err and "step_3" in err
    assert "RUN:WEIGHT" in refusal(capsys, ["mix", f"{attn}:half", str(both)] + out)
    assert "unknown model" in refusal(capsys, ["scale", str(attn), "--scale", "1", "--model", "sd14",
                                               "--output", str(tmp_path / "out")])
    # a LoRA of another model: its first attention layer is 7 features wide, the tiny UNet's 32
    layers = lora_tools.scale_lora(common.lora.read_lora(attn), 1.0)
    name = next(iter(layers))
    layers[name] = (torch.zeros(2, 7), layers[name][1])
    common.lora.write_lora(layers, tmp_path / "alien")
    assert "does not fit --model tiny" in refusal(capsys, ["export", str(tmp_path / "alien"), "--model", "tiny",
                                                           "--output", str(tmp_path / "x.safetensors")])
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.safetensors").exists()
    lora_tools.main(["scale", str(attn), "--scale", "1"] + out)
    assert "--overwrite" in refusal(capsys, ["scale", str(attn), "--scale", "2"] + out)
    lora_tools.main(["scale", str(attn), "--scale", "2", "--overwrite"] + out)


def test_cli_refusal_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "lora_tools.py"), "mix", f"{tmp_path / 'missing'}:1",
                           "--model", "tiny", "--output", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr and "Traceback" not in proc.stderr
