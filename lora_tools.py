"""After training: scale a LoRA, mix LoRAs, draw them across scales or weights, export them for the web UIs.

DRaFT (Clark, Vicol, Swersky & Fleet, ICLR 2024, arXiv:2309.17400) fine-tunes only low-rank adapters (§4, "LoRA"):
each adapted weight is W0 + ΔW with ΔW = B·A of rank r, and the base weights W0 stay as they were. Because the
fine-tuning is one additive term, the paper gets two things for free (§5.2, Fig. 5 right, Fig. 7):
- scaling: W0 + s·ΔW moves between the pre-trained model (s = 0) and the fine-tuned one (s = 1), and past it
  (s > 1, extrapolation), which trades reward against closeness to the base model after training;
- mixing: adapters trained on different rewards combine by a weighted sum, W0 + Σ_i w_i·ΔW_i, with no training.
This tool writes such LoRAs as ordinary LoRA files (`scale`, `mix`), draws fixed prompts and seeds across scales or
mixing weights (`grid`, the paper's Fig. 7), writes a LoRA in the kohya key format that AUTOMATIC1111, ComfyUI
and most other SD1.x tools load, with the metadata they read, or as a peft adapter (`export`), and uploads a finished
run with its model card to the Hugging Face Hub (`push`).

LoRA arguments are run directories (their final LoRA), `checkpoints/step_N` folders, or any folder holding
`pytorch_lora_weights.safetensors`. `--model` is the base model they were trained on, as in the training scripts
(`tiny` and `tiny-shapes` for CPU tests, a hub id or a local diffusers folder otherwise); every LoRA is checked
against it before anything is written.

    python lora_tools.py scale runs/draft --scale 0.5 --output runs/draft_half
    python lora_tools.py mix runs/aesthetic:1.0 runs/hps:0.5 --output runs/aesthetic_hps
    python lora_tools.py grid runs/draft --scales 0,0.5,1,1.5 --seeds 0,1 --output scale_grid.png
    python lora_tools.py grid runs/aesthetic runs/hps --weights "1,0;0,1;1,1" --output mix_grid.png
    python lora_tools.py export runs/draft --format kohya --output draft_kohya.safetensors
    python lora_tools.py export runs/draft --format peft --output draft_peft
    python lora_tools.py push runs/draft --repo-id your-name/draft-aesthetic
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from collections import Counter
from pathlib import Path

import torch

import common
from common.lora import (KOHYA_FILE, LORA_FILE, denoiser_name, has_kohya_format, lora_file, read_lora, write_kohya,
                         write_lora)

Layers = dict[str, tuple[torch.Tensor, torch.Tensor]]  # {module: (A [r, in], B [out, r])}, ΔW = B·A
PEFT_FILE = "adapter_model.safetensors"
# What `push` uploads (huggingface_hub's allow_patterns): the model card and everything it shows or links, the
# TensorBoard logs (the Hub draws them), not the checkpoints (optimizer state, several times the LoRA's size)
PUBLISHED = ("README.md", LORA_FILE, KOHYA_FILE, "args.json", "metrics.jsonl", "eval.jsonl", "samples/*.png",
             "events.out.tfevents.*")


def scale_lora(layers: Layers, s: float) -> Layers:
    """s·ΔW = (s·B)·A: only B is multiplied (scaling A too would scale ΔW by s²)."""
    return {m: (a, s * b) for m, (a, b) in layers.items()}


def mix_loras(weighted: list[tuple[Layers, float]]) -> Layers:
    """Σ_i w_i·B_i·A_i, exactly, as one LoRA: per module the ranks are concatenated, A_i stacked along the rank
    dimension and the w_i·B_i side by side, so [w_1·B_1 … w_n·B_n]·[A_1; …; A_n] = Σ_i w_i·B_i·A_i (a block
    product). A module adapted by only some of the LoRAs gets only their blocks; the mix's rank there is the sum of
    theirs, so nothing is approximated (no SVD truncation)."""
    modules = sorted({m for layers, _ in weighted for m in layers})
    mixed = {}
    for m in modules:
        parts = [(layers[m][0], w * layers[m][1]) for layers, w in weighted if m in layers]
        mixed[m] = (torch.cat([a for a, _ in parts], dim=0), torch.cat([b for _, b in parts], dim=1))
    return mixed


def write_peft(layers: Layers, directory: Path, base_model: str | None = None) -> Path:
    """A peft adapter folder (`adapter_config.json` + `adapter_model.safetensors`, peft's own names and key layout
    `base_model.model.<module>.lora_A/lora_B.weight`) that `PeftModel.from_pretrained(unet, directory)` applies to a
    diffusers UNet as ΔW = B·A: alpha = rank for every module (scale 1), other ranks in a rank pattern, as
    `write_lora` does."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    ranks = {m: a.shape[0] for m, (a, _) in layers.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: r for m, r in ranks.items() if r != rank}
    config = LoraConfig(r=rank, lora_alpha=rank, rank_pattern=pattern, alpha_pattern=pattern,
                        target_modules=sorted(layers), base_model_name_or_path=base_model)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    state = {}
    for m, (a, b) in layers.items():
        state[f"base_model.model.{m}.lora_A.weight"] = a.float().contiguous()
        state[f"base_model.model.{m}.lora_B.weight"] = b.float().contiguous()
    save_file(state, str(directory / PEFT_FILE), metadata={"format": "pt"})
    return directory


def load_base(model: str, device="cpu", dtype=torch.float32):
    """The base pipeline without any adapter, as the training scripts load it."""
    try:
        return common.load_pipeline(model, lora_rank=0, device=device, dtype=dtype)
    except (ValueError, RuntimeError) as e:  # load_pipeline's messages for an unknown or unavailable --model
        raise common.UserError(str(e)) from e


def check_fits(layers: Layers, net, source: str, model: str) -> None:
    """Every adapted module must exist in the base model's denoiser (UNet or transformer) with the LoRA's input and
    output sizes."""
    modules = dict(net.named_modules())
    for name, (a, b) in layers.items():
        layer = modules.get(name)
        if layer is None or not hasattr(layer, "in_features"):
            raise common.UserError(f"{source} does not fit --model {model}: it adapts {name!r}, which that model's "
                                   "denoiser has no linear layer of (a LoRA of another base model?)")
        if (a.shape[1], b.shape[0]) != (layer.in_features, layer.out_features):
            raise common.UserError(f"{source} does not fit --model {model}: {name} maps {a.shape[1]} -> {b.shape[0]} "
                                   f"features there, {layer.in_features} -> {layer.out_features} in the model "
                                   "(a LoRA of another base model?)")


def parse_weighted(spec: str) -> tuple[str, float]:
    """RUN:WEIGHT, or RUN alone for weight 1 (as in the scripts' --reward "name:weight" specs)."""
    if Path(spec).exists() or ":" not in spec:
        return spec, 1.0
    run, _, weight = spec.rpartition(":")
    try:
        value = float(weight)
    except ValueError:
        value = math.nan
    if not run or not math.isfinite(value):
        raise common.UserError(f"{spec!r}: expected RUN:WEIGHT with a finite number as WEIGHT, e.g. runs/draft:0.5")
    return run, value


def parse_list(text: str, flag: str, kind=float) -> list:
    """"0,0.5,1" -> [0.0, 0.5, 1.0] (kind=float: finite numbers; kind=int: non-negative integers such as seeds)."""
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and (kind is float or v >= 0) for v in values):
        what = "finite numbers, e.g. 0,0.5,1" if kind is float else "non-negative integers, e.g. 0,1"
        raise common.UserError(f"{flag} {text!r}: expected comma-separated {what}")
    return values


def check_output(path: Path, overwrite: bool, suffix: str | None = None, file: str = LORA_FILE) -> None:
    """Refuse to replace a file unless --overwrite; a file output must have the expected suffix, a folder output
    (suffix None) is checked for `file`."""
    if suffix is not None and path.suffix.lower() != suffix:
        raise common.UserError(f"--output {path}: expected a {suffix} file")
    target = path if suffix is not None else path / file
    if suffix is None and path.is_file():
        raise common.UserError(f"--output {path} is a file; expected a folder to write the LoRA to")
    if target.exists() and not overwrite:
        raise common.UserError(f"--output {target} already exists; choose another --output, or pass --overwrite")


def read_checked(runs: list[str], model: str) -> tuple[list[Layers], str]:
    """Read every LoRA first (cheap errors before the model loads), then check each against the base model. Returns
    the LoRAs and the base model's denoiser ("unet", "transformer"), the prefix of the file to write."""
    loras = [read_lora(run) for run in runs]
    pipe = load_base(model)
    for run, layers in zip(runs, loras):
        check_fits(layers, common.denoiser(pipe), run, model)
    return loras, denoiser_name(pipe)


def cmd_scale(args) -> None:
    if not math.isfinite(args.scale):
        raise common.UserError(f"--scale {args.scale}: expected a finite number")
    check_output(Path(args.output), args.overwrite)
    (layers,), prefix = read_checked([args.run], args.model)
    path = write_lora(scale_lora(layers, args.scale), args.output, prefix)
    print(f"{args.run} × {args.scale:g} -> {path}")


def cmd_mix(args) -> None:
    specs = [parse_weighted(s) for s in args.runs]
    check_output(Path(args.output), args.overwrite)
    loras, prefix = read_checked([run for run, _ in specs], args.model)
    path = write_lora(mix_loras([(layers, w) for layers, (_, w) in zip(loras, specs)]), args.output, prefix)
    print(" + ".join(f"{w:g}·{run}" for run, w in specs) + f" -> {path}")


def cmd_export(args) -> None:
    output = Path(args.output)
    if args.format == "kohya":
        check_output(output, args.overwrite, ".safetensors")
    else:
        check_output(output, args.overwrite, file=PEFT_FILE)
    layers = read_lora(args.run)
    pipe = load_base(args.model)
    check_fits(layers, common.denoiser(pipe), args.run, args.model)
    if args.format == "kohya" and not has_kohya_format(pipe):
        raise common.UserError(f"--format kohya is for SD1.x/SD2.x UNet LoRAs: kohya's key format has no standard for "
                               f"an SD3 transformer LoRA; {lora_file(args.run)} (diffusers' format) is what SD3 tools "
                               "load (diffusers, ComfyUI), or use --format peft")
    if args.format == "kohya":
        write_kohya(layers, output, pipe, title=output.stem, base_model=args.model)
    else:
        hub_id = args.model.count("/") == 1 and not Path(args.model).is_dir()
        write_peft(layers, output, args.model if hub_id else None)
    print(f"{args.run} -> {output} ({args.format} format)")


def cmd_push(args) -> None:
    import httpx2  # huggingface_hub's HTTP client: a connection that fails raises its errors
    import huggingface_hub
    from huggingface_hub import constants as hub_constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    run = Path(args.run)
    if not (run / LORA_FILE).is_file() or not (run / "args.json").is_file():
        raise common.UserError(f"{run} is not the directory of a finished run (it needs {LORA_FILE} and args.json)")
    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as e:
        raise common.UserError(f"--repo-id {args.repo_id!r}: {e}") from e
    if hub_constants.HF_HUB_OFFLINE:  # refused before the card below is written
        raise common.UserError(f"could not push {run}: huggingface_hub is in offline mode (HF_HUB_OFFLINE is set); "
                               "unset it on a machine with network")
    if not (run / "README.md").is_file():  # a run from before the scripts wrote model cards
        common.write_model_card(run, json.loads((run / "args.json").read_text()))
    try:
        huggingface_hub.create_repo(args.repo_id, private=args.private, exist_ok=True)
        commit = huggingface_hub.upload_folder(repo_id=args.repo_id, folder_path=str(run),
                                               allow_patterns=list(PUBLISHED),
                                               commit_message=f"{run.name}: LoRA, model card, metrics, samples")
    except (OSError, httpx2.HTTPError) as e:  # offline, no network, no token, no write access, ...
        reason = (str(e).strip().splitlines() or [""])[0]
        raise common.UserError(f"could not push {run} to the Hub repo {args.repo_id} ({type(e).__name__}: {reason}); "
                               "it needs the network, HF_HUB_OFFLINE unset and a write token (`hf auth login` or "
                               "HF_TOKEN)") from e
    print(f"{run} -> {getattr(commit, 'commit_url', commit)}")


def cmd_grid(args) -> None:
    from diffusers.utils import logging as diffusers_logging

    output = Path(args.output)
    check_output(output, args.overwrite, ".png")
    if len(args.runs) > 1 and args.weights is None:
        raise common.UserError("several runs need --weights, one comma-separated weight per run for each column, "
                               'e.g. --weights "1,0;0,1;1,1"')
    if args.weights is not None:
        columns = [parse_list(c, "--weights") for c in args.weights.split(";") if c.strip()]
        if not columns or any(len(c) != len(args.runs) for c in columns):
            raise common.UserError(f"--weights {args.weights!r}: each ';'-separated column needs {len(args.runs)} "
                                   "comma-separated weights, one per run")
        labels = ["weights " + ", ".join(f"{w:g}" for w in c) for c in columns]
    else:
        columns = [[s] for s in parse_list(args.scales, "--scales")]
        labels = [f"scale {c[0]:g}" for c in columns]
    seeds = parse_list(args.seeds, "--seeds", int)
    prompts = common.load_prompts(args.prompts, args.prompt_file, args.model)[: args.num_prompts]
    for run in args.runs:
        lora_file(run)  # a missing LoRA fails before the model loads
    if args.num_prompts < 1:
        raise common.UserError(f"--num-prompts {args.num_prompts}: expected at least 1")
    try:
        device, dtype = common.device_and_dtype(args.mixed_precision)
    except ValueError as e:  # e.g. fp16 asked for on a machine without CUDA
        raise common.UserError(str(e)) from e
    pipe = load_base(args.model, device, dtype)
    diffusers_logging.set_verbosity_error()  # not "no LoRA keys for the text encoder" for every UNet-only LoRA
    names = []
    for i, run in enumerate(args.runs):
        check_fits(read_lora(run), common.denoiser(pipe), run, args.model)
        file = lora_file(run)
        names.append(f"lora{i}")
        with warnings.catch_warnings():  # peft warns that a second adapter is a second adapter
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=names[-1])

    # rows: (prompt, seed); columns: scales or weight vectors, set through diffusers' own set_adapters
    cells = {}
    for col, weights in enumerate(columns):
        pipe.set_adapters(names, weights)
        for seed in seeds:
            cells[col, seed] = common.sample_images(pipe, prompts, seed, args.num_inference_steps,
                                                    args.guidance_scale, args.eta).float().cpu()
    images = torch.stack([cells[col, seed][p] for p in range(len(prompts)) for seed in seeds
                          for col in range(len(columns))])
    rows = [f"{p} (seed {seed})" for p in prompts for seed in seeds]
    header = (f"{' + '.join(args.runs)} on {args.model} · T = {args.num_inference_steps}, "
              f"w = {args.guidance_scale:g}, eta = {args.eta:g}")  # Pillow's default font has no Greek
    common.save_grid(images, output, len(columns), rows, labels * len(rows), header)
    print(f"{len(rows)} rows × {len(columns)} columns -> {output}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora_tools.py", description=__doc__.split("\n\n")[0])
    common_flags = argparse.ArgumentParser(add_help=False)
    common_flags.add_argument("--model", default=common.SD14,
                              help="the base model the LoRAs were trained on: hub id or local diffusers folder "
                                   "(SD1.x/2.x, SDXL, SD3.x), or a built-in model (`tiny`, `tiny-shapes`, `tiny-sdxl`, "
                                   "`tiny-sd3`, ...) (default: %(default)s)")
    common_flags.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("scale", parents=[common_flags], help="a LoRA multiplied by s (0 = base model, >1 extrapolates)")
    p.add_argument("run", help="run directory, checkpoints/step_N or LoRA folder")
    p.add_argument("--scale", type=float, required=True, help="s in W0 + s·ΔW")
    p.add_argument("--output", required=True, help="folder to write the scaled LoRA to")
    p.set_defaults(fn=cmd_scale)

    p = sub.add_parser("mix", parents=[common_flags], help="the weighted sum of LoRAs, exact, as one LoRA")
    p.add_argument("runs", nargs="+", metavar="RUN:WEIGHT", help="LoRAs and their weights (RUN alone: weight 1)")
    p.add_argument("--output", required=True, help="folder to write the mixed LoRA to")
    p.set_defaults(fn=cmd_mix)

    p = sub.add_parser("grid", parents=[common_flags], help="fixed prompts and seeds across scales or mixing weights")
    p.add_argument("runs", nargs="+", metavar="RUN", help="one LoRA (columns: --scales) or several (--weights)")
    p.add_argument("--scales", default="0,0.5,1,1.5", help="with one run: the scales of the columns (%(default)s)")
    p.add_argument("--weights", default=None,
                   help='with several runs: one column per ";"-separated list of per-run weights, e.g. "1,0;0,1;1,1"')
    p.add_argument("--prompts", default=None,
                   help="named prompt set (default: the model's, as in the scripts)")
    p.add_argument("--prompt-file", default=None, help="newline-separated prompts; overrides --prompts")
    p.add_argument("--num-prompts", type=int, default=4, help="the first this many prompts (%(default)s)")
    p.add_argument("--seeds", default="0,1", help="seeds of the initial noise, one row each per prompt (%(default)s)")
    p.add_argument("--num-inference-steps", type=int, default=50, help="DDIM steps T (gradient scripts: 50)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="guidance weight w (gradient scripts: 7.5)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM η (gradient scripts: 0; RL scripts: 1)")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
                   help="dtype of the base weights, as in the scripts (auto: fp16 on CUDA, float32 on the CPU)")
    p.add_argument("--output", required=True, help="the PNG to write")
    p.set_defaults(fn=cmd_grid)

    p = sub.add_parser("export", parents=[common_flags],
                       help="the LoRA for the web UIs (kohya: A1111, ComfyUI) or as a peft adapter")
    p.add_argument("run", help="run directory, checkpoints/step_N or LoRA folder")
    p.add_argument("--format", default="kohya", choices=["kohya", "peft"],
                   help="kohya: one .safetensors file with the web UIs' metadata; peft: a folder with "
                        "adapter_config.json for PeftModel.from_pretrained(unet, folder) (%(default)s)")
    p.add_argument("--output", required=True, help="the .safetensors file (kohya) or the folder (peft) to write")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("push", help="upload a finished run (LoRA, kohya copy, model card, metrics, sample grids, "
                                    "TensorBoard logs; not its checkpoints) to a Hugging Face Hub model repo")
    p.add_argument("run", help="the run directory")
    p.add_argument("--repo-id", required=True, help="NAME or OWNER/NAME of the model repo (created if absent)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.set_defaults(fn=cmd_push)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with common.user_errors():
        args.fn(args)


if __name__ == "__main__":
    main()
