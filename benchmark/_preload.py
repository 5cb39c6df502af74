"""Third-party imports of the eight scripts, loaded once by compare.py's fork server so that each run starts in
~1 s instead of paying torch/diffusers/transformers' import time (10–20 s on this machine) again.

Only third-party libraries: the repository's own modules (common, rewards, shapes and the scripts) are imported
fresh by every run, so edits to them between runs are picked up."""

import numpy  # noqa: F401
import PIL.Image  # noqa: F401
import torch  # noqa: F401
import torch.utils.checkpoint  # noqa: F401
import torch.utils.tensorboard  # noqa: F401
import tqdm  # noqa: F401
import tyro  # noqa: F401
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft  # noqa: F401
from peft import LoraConfig  # noqa: F401
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: F401
from safetensors.torch import load_file, save_file  # noqa: F401
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: F401

try:
    import kornia.enhance  # noqa: F401  (the differentiable JPEG reward)
except ImportError:
    pass
