"""trl 0.23.1's DDPOTrainer and AlignPropTrainer on a saved pipeline folder: seconds per sampled image (issue 17).

NEEDS ITS OWN VIRTUAL ENVIRONMENT (trl is not a dependency of this project; never install it into the main one):

    python -m venv --system-site-packages /work/venv-trl
    /work/venv-trl/bin/pip install trl==0.23.1 datasets ftfy   # torch, diffusers, transformers, peft: the main ones
    /work/venv-trl/bin/python benchmark/trl_side.py ddpo --pipeline DIR

`benchmark/bench_speed.py trl` runs this next to the project's scripts on the same folder (`tiny` saved with
`save_pretrained`) and the same settings, alternating the two. The reward is this project's own
(`rewards.load`), so both sides score with the same code; trl's reward_fn contract is (images, prompts, metadata)
-> (rewards, metadata) (trl/trainer/ddpo_trainer.py, compute_rewards). Prints one JSON line: the wall-clock and CPU
seconds of `trainer.train()` (model loading excluded, as bench_speed.py excludes it on our side), and per sampled
image.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("algorithm", choices=("ddpo", "alignprop"))
    p.add_argument("--pipeline", required=True, help="a diffusers Stable Diffusion folder (e.g. tiny, saved)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps T")
    p.add_argument("--epochs", type=int, default=2, help="DDPO: sampled batches; AlignProp: optimizer updates")
    p.add_argument("--sample-batch-size", type=int, default=8, help="DDPO: images per sampling call")
    p.add_argument("--batches-per-epoch", type=int, default=2, help="DDPO: sampling calls per epoch")
    p.add_argument("--train-batch-size", type=int, default=4, help="DDPO: images per update; AlignProp: per batch")
    p.add_argument("--k", type=int, default=10, help="AlignProp: backpropagate through the last k steps")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    import torch
    from accelerate import PartialState
    from trl import (AlignPropConfig, AlignPropTrainer, DDPOConfig, DDPOTrainer,
                     DefaultDDPOStableDiffusionPipeline)
    from trl import __version__ as trl_version

    import common
    import rewards

    prompts = common.load_prompts("simple_animals")  # the scripts' default set for a local folder
    rng = random.Random(args.seed)
    reward = rewards.load("jpeg_compressibility" if args.algorithm == "ddpo" else "jpeg_compressibility_diff")

    def prompt_fn():
        return rng.choice(prompts), {}

    def reward_fn(images, prompts, metadata):
        return reward(images, list(prompts)), {}

    PartialState()  # trl's pipeline logs through accelerate (no LoRA file in the folder) before its Accelerator exists
    pipeline = DefaultDDPOStableDiffusionPipeline(args.pipeline, use_lora=True)  # LoRA r = 4 on to_q/k/v/out.0
    with tempfile.TemporaryDirectory() as tmp:
        common_config = dict(num_epochs=args.epochs, seed=args.seed, mixed_precision="no", save_freq=10**9,
                             sample_num_steps=args.steps, project_kwargs=dict(project_dir=tmp, logging_dir=tmp),
                             logdir=tmp)
        if args.algorithm == "ddpo":
            # ddpo_is.py's settings: η = 1, w = 5, clipped updates over every timestep, per-prompt statistics
            config = DDPOConfig(**common_config, sample_eta=1.0, sample_guidance_scale=5.0,
                                sample_batch_size=args.sample_batch_size,
                                sample_num_batches_per_epoch=args.batches_per_epoch,
                                train_batch_size=args.train_batch_size, train_learning_rate=3e-4,
                                train_adam_weight_decay=1e-4, train_max_grad_norm=1.0, train_clip_range=1e-4,
                                train_adv_clip_max=5.0, train_timestep_fraction=1.0, per_prompt_stat_tracking=True,
                                per_prompt_stat_tracking_buffer_size=32, per_prompt_stat_tracking_min_count=16)
            trainer = DDPOTrainer(config, reward_fn, prompt_fn, pipeline)
            images = args.epochs * args.batches_per_epoch * args.sample_batch_size
        else:
            # alignprop.py --truncation fixed --k K: η = 0, w = 7.5, gradient through the last K steps (trl counts
            # the steps whose noise prediction is detached: i < truncated_backprop_timestep)
            config = AlignPropConfig(**common_config, sample_eta=0.0, sample_guidance_scale=7.5,
                                     train_batch_size=args.train_batch_size, train_learning_rate=1e-3,
                                     train_adam_weight_decay=0.1, train_max_grad_norm=5.0,
                                     truncated_backprop_rand=False, truncated_backprop_timestep=args.steps - args.k)
            trainer = AlignPropTrainer(config, reward_fn, prompt_fn, pipeline)
            images = args.epochs * args.train_batch_size
        w0, c0 = time.perf_counter(), time.process_time()
        trainer.train()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    print(json.dumps(dict(side="trl", trl=trl_version, torch=torch.__version__, algorithm=args.algorithm,
                          wall=round(wall, 3), cpu=round(cpu, 3), images=images,
                          wall_per_image=round(wall / images, 4), cpu_per_image=round(cpu / images, 4))))


if __name__ == "__main__":
    main()
