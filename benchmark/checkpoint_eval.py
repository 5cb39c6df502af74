"""A run's sample-grid metrics for each of its checkpoints, at LoRA scales and for its EMA: the figures of
docs/regularisers.md (the LoRA-scale remedy of DRaFT §5, and the trained LoRA of an --ema-decay run, whose own grid
shows the average).

    python benchmark/checkpoint_eval.py RUN [--scales 1,0.5] [--ema] > RUN/checkpoint_eval.jsonl

One JSON line per (checkpoint, scale, weights): the step, the scale, `weights` (`lora` or `ema`: the average kept in
the checkpoint's training_state.pt), and the grid's metrics (eval_reward, eval/<held-out reward>, eval/diversity) on
the run's own grid (its prompts, seeds, sampler and rewards, from args.json). Keep every checkpoint with
`--keep-checkpoints 0`.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import rewards  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--scales", default="1", help="LoRA scales s of W0 + s·ΔW (%(default)s)")
    parser.add_argument("--ema", action="store_true", help="also the EMA kept in each checkpoint")
    args = parser.parse_args()
    run = Path(args.run)
    config = types.SimpleNamespace(**json.loads((run / "args.json").read_text()))
    targets = common.ATTENTION_TARGETS + (common.FEEDFORWARD_TARGETS if getattr(config, "lora_ff", False) else ())
    pipe = common.load_pipeline(config.model, config.lora_rank, lora_targets=targets, resolution=config.resolution)
    params = common.lora_parameters(pipe)
    prompts = common.load_prompts(config.prompts, config.prompt_file, config.model)
    grid = common.SampleGrid.from_args(config, prompts, rewards.load(config.reward),
                                       {spec: rewards.load(spec) for spec in config.eval_rewards})
    checkpoints = sorted((run / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))
    for ckpt in checkpoints:
        common.load_lora(pipe, ckpt)
        for scale in [float(s) for s in args.scales.split(",")]:
            common.set_lora_scale(pipe, scale)
            print(json.dumps(dict(step=int(ckpt.name[5:]), scale=scale, weights="lora") | grid(pipe).metrics()),
                  flush=True)
        common.set_lora_scale(pipe, 1.0)
        shadow = torch.load(ckpt / "training_state.pt", weights_only=True)["state"].get("ema", {}).get("shadow")
        if args.ema and shadow:
            with torch.no_grad():
                for p, s in zip(params, shadow, strict=True):
                    p.copy_(s)
            print(json.dumps(dict(step=int(ckpt.name[5:]), scale=1.0, weights="ema") | grid(pipe).metrics()),
                  flush=True)


if __name__ == "__main__":
    main()
