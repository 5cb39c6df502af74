"""The thin shared core: mechanics identical for all eight algorithms. The algorithms live in the scripts."""

from .diffusion import (
    Trajectory,
    add_noise,
    check_scheduler,
    step_mean_std,
    step,
    step_with_logprob,
    decode,
    denoiser,
    denoising_target,
    encode,
    encode_prompts,
    family,
    guided_noise_pred,
    initial_latents,
    predict_x0,
    sample_images,
    sample_trajectory,
    sampler,
)
from .errors import UserError, check_flags, require, user_errors
from .evaluation import GridResult, SampleGrid, diversity
from .checkpoint import Checkpointer, StopSignal, UpdateGuard, cli, find_checkpoint, resume_args
from .distributed import (
    average_gradients, check_batch_split, gather, launched_world_size, randint, randn, setup_distributed, shard
)
from .lora import KOHYA_FILE, LORA_FILE, load_lora, save_lora, set_lora_scale
from .models import (
    ATTENTION_TARGETS, FEEDFORWARD_TARGETS, SD14, clip_tokenizer, load_pipeline, lora_parameters, set_resolution
)
from .prompts import PROMPT_SETS, load_prompts, sample_prompts
from .publish import finish_run, write_model_card
from .regularisers import (
    EMA_FILE, LoraEMA, PretrainData, base_model, denoising_loss, kl_to_base, load_image_captions, prediction_gap
)
from .run import Logger, check_run_args, device_and_dtype, make_run_dir, save_grid, seed_everything
