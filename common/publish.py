"""The end of a run: the LoRA in diffusers' format, its copy in kohya's format for the web UIs, and a model card
(README.md) that the Hugging Face Hub reads (`lora_tools.py push` uploads the run directory)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from .errors import UserError
from .lora import KOHYA_FILE, LORA_FILE, has_kohya_format, lora_prefix, read_lora, save_lora, write_kohya
from .models import BUILT_IN_MODELS, NO_T5, SD14
from .run import read_jsonl

LICENSES = {SD14: "creativeml-openrail-m"}  # the default base model's card on the Hub, for when it is not cached


def finish_run(pipe, run_dir: str | Path, args, ema=None) -> None:
    """Rank 0, after the last update: the LoRA in diffusers' format (`save_lora`), the same LoRA in kohya's format
    (`lora_kohya.safetensors`: ComfyUI does not load diffusers' key names for an attention-only LoRA, and
    AUTOMATIC1111 reads the kohya metadata), with --ema-decay the moving average beside it in diffusers' format
    (`lora_ema.safetensors`), and the model card (`write_model_card`). The kohya copy is for UNet LoRAs
    (SD1.x/SD2.x, SDXL): kohya's format of an SD3 transformer LoRA has no converter in diffusers, and ComfyUI reads
    diffusers' SD3 LoRA files (its "transformer." keys) as they are."""
    from .regularisers import EMA_FILE

    run_dir = Path(run_dir)
    if ema is not None and ema.shadow:
        with ema.applied():
            save_lora(pipe, run_dir, weight_name=EMA_FILE)
    layers = read_lora(save_lora(pipe, run_dir))
    if has_kohya_format(pipe):
        write_kohya(layers, run_dir / KOHYA_FILE, pipe, title=run_dir.name, base_model=args.model)
    write_model_card(run_dir, args)


def _is_hub_id(model: str) -> bool:
    return model not in BUILT_IN_MODELS and not Path(model).is_dir() and model.count("/") == 1


def base_license(model: str) -> str | None:
    """The `license` field of the base model's card: a local folder's README.md, or the Hub's from the local cache
    (nothing is downloaded at the end of a run), else the known license of the default model; None if unknown."""
    import yaml
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.repocard import metadata_load

    if model in BUILT_IN_MODELS:
        return None
    try:
        readme = Path(model) / "README.md" if Path(model).is_dir() else try_to_load_from_cache(model, "README.md")
        if isinstance(readme, (str, Path)) and Path(readme).is_file():
            license = (metadata_load(readme) or {}).get("license")
            if isinstance(license, str):
                return license
    except (OSError, ValueError, yaml.YAMLError):  # an odd card or cache is no reason to fail the run's end
        pass
    return LICENSES.get(model)


def _cell(value) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, str], rows: dict) -> str:
    return "\n".join([f"| {header[0]} | {header[1]} |", "|---|---|"]
                     + [f"| {_cell(k)} | {_cell(v)} |" for k, v in rows.items()])


def _last_row(path: Path) -> dict:
    return (read_jsonl(path) or [{}])[-1]  # the run's own log reader: a torn last line is dropped, not a crash


def _example_prompt(config: dict) -> str:
    from .prompts import load_prompts

    try:
        return load_prompts(config.get("prompts"), config.get("prompt_file"), config["model"])[0]
    except UserError:  # e.g. a run's prompt file that has since moved: the snippet still works with any prompt
        return "a photo of a cat"


def write_model_card(run_dir: str | Path, args) -> Path:
    """README.md in `run_dir`: YAML front matter as the Hub and diffusers' training scripts write it (base_model,
    library_name, license, tags), then the script and its paper, the reward, the number of updates, the last sample
    grid, the final metrics (the last rows of metrics.jsonl and eval.jsonl), how to load the LoRA with diffusers, and
    every flag. `args` is the run's Args (its script is where the dataclass is defined) or the dict of args.json."""
    from huggingface_hub import ModelCardData

    run_dir = Path(run_dir)
    config = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args)
    module = sys.modules.get(type(args).__module__) if dataclasses.is_dataclass(args) else None
    script = Path(module.__file__).stem if getattr(module, "__file__", None) else config.get("exp_name", "unknown")
    paper = (module.__doc__ or "").strip().split("\n")[0].rstrip(".") if module is not None else ""
    model, reward = config["model"], config["reward"]
    model, no_t5 = model.removesuffix(NO_T5), model.endswith(NO_T5)
    license = base_license(model)
    metrics, evaluation = _last_row(run_dir / "metrics.jsonl"), _last_row(run_dir / "eval.jsonl")
    evaluation.pop("scores", None)  # per image: the grid shows them
    grids = sorted(run_dir.glob("samples/step_*.png"))
    # an SD3 run's LoRA adapts the transformer ("transformer." keys): its pipeline, sampler and files differ
    sd3 = (run_dir / LORA_FILE).is_file() and lora_prefix(run_dir) == "transformer"

    data = ModelCardData(base_model=model if _is_hub_id(model) else None, library_name="diffusers", license=license,
                         tags=["text-to-image", "stable-diffusion", "diffusers", "lora", "reward-fine-tuning",
                               script.replace("_", "-")])
    base = f"[`{model}`](https://huggingface.co/{model})" if _is_hub_id(model) else f"`{model}`"
    lines = [f"# {run_dir.name}", "",
             f"A LoRA on the {'transformer' if sd3 else 'UNet'} of {base}, fine-tuned by `{script}.py`{f' ({paper})' if paper else ''} to raise "
             f"the reward `{reward}`: {metrics.get('step', 0)} of {config.get('steps')} optimizer updates, "
             f"{metrics.get('reward_queries', 0):g} reward queries.", ""]
    if grids:
        grid = grids[-1].relative_to(run_dir).as_posix()
        lines += [f"![The sample grid after {evaluation.get('step', '?')} updates]({grid})", "",
                  f"`{grid}`: fixed prompts and seeds, sampled with the LoRA; `samples/step_000000.png` is the same "
                  "grid from the base model.", ""]
    if sd3 and (_is_hub_id(model) or Path(model).is_dir()):
        without_t5 = ", text_encoder_3=None, tokenizer_3=None" if no_t5 else ""  # trained without T5
        load = [f"pipe = StableDiffusion3Pipeline.from_pretrained({model!r}{without_t5}, "
                "torch_dtype=torch.bfloat16).to('cuda')"]
        imports = ["import torch", "from diffusers import StableDiffusion3Pipeline"]
    elif _is_hub_id(model) or Path(model).is_dir():
        # DiffusionPipeline picks the model's own class (StableDiffusionPipeline, StableDiffusionXLPipeline, ...)
        load = [f"pipe = DiffusionPipeline.from_pretrained({model!r}, torch_dtype=torch.float16).to('cuda')",
                "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the sampler it was trained with"]
        imports = ["import torch", "from diffusers import DDIMScheduler, DiffusionPipeline"]
    else:  # the built-in test models exist only in this project's common/
        load = [f"pipe = common.load_pipeline({config['model']!r}, lora_rank=0)  # the sampler it was trained with"]
        imports = ["import common  # this project's common/"]
    size = f", height={config['resolution']}, width={config['resolution']}" if config.get("resolution") else ""
    eta = "" if sd3 else f", eta={config.get('eta', 0.0)}"  # SD3's pipeline samples the ODE (no eta)
    call = (f"image = pipe({_example_prompt(config)!r}, num_inference_steps={config.get('num_inference_steps', 50)}, "
            f"guidance_scale={config.get('guidance_scale', 7.5)}{eta}{size}).images[0]")
    lines += ["## Use it", "", "```python", *imports, "", *load,
              f"pipe.load_lora_weights({str(run_dir)!r})  # this folder, or the Hub repo it was pushed to", call,
              "```", "",
              f"ComfyUI reads `{LORA_FILE}` (diffusers' SD3 format) as it is." if sd3 else
              f"AUTOMATIC1111, ComfyUI and the other web UIs: `{KOHYA_FILE}`, the same LoRA in kohya's format "
              f"(`{LORA_FILE}` is diffusers' format).", ""]
    lines += ["## Final metrics", "", f"Training batch at update {metrics.get('step', '?')} (`metrics.jsonl`):", "",
              _table(("metric", "value"), {k: v for k, v in metrics.items() if k != "step"}), ""]
    if evaluation:
        lines += [f"Sample grid at update {evaluation.get('step', '?')} (`eval.jsonl`):", "",
                  _table(("metric", "value"), {k: v for k, v in evaluation.items() if k != "step"}), ""]
    lines += ["## Training arguments", "", f"`python {script}.py` with:", "",
              _table(("flag", "value"), {"--" + k.replace("_", "-"): v for k, v in config.items()}), "",
              f"License: {license}, the base model's." if license else
              "License: unknown (the base model's card was not found); set `license:` above before publishing.", ""]
    path = run_dir / "README.md"
    path.write_text(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    return path
