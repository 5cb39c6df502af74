"""Loading a diffusers pipeline of a supported family (Stable Diffusion 1.x/2.x, SDXL, SD3.x; common.diffusion.FAMILIES)
or one of the offline models (`tiny`, `tiny-shapes`, `tiny-shapes-flow`, `sd14-random`, `tiny-sdxl`, `sdxl-random`,
`tiny-sd3`, `sd35m-random`) with a trainable LoRA on its denoiser (UNet or transformer)."""

from __future__ import annotations

import copy
import functools
import gzip
import json
import os
from pathlib import Path

import torch

from .diffusion import FAMILIES, SAMPLERS, check_scheduler, denoiser, family
from .errors import UserError

SD14 = "CompVis/stable-diffusion-v1-4"
SD35M = "stabilityai/stable-diffusion-3.5-medium"
# `--model NAME:no-t5`: an SD3 model without its T5-XXL text encoder (4.7 B parameters: 19 GB in float32, 9.5 GB in
# bf16), which the pipeline replaces by zeros (SD3 was trained with T5 dropped at random, SD3 paper §5.3.3)
NO_T5 = ":no-t5"
# `--model tiny-shapes` is this diffusers folder: the CPU testbed's model (written by `python -m shapes.pretrain`).
# A path, not an import, so common/ needs nothing from shapes/; absent where only common/ and rewards/ were copied.
TINY_SHAPES = Path(__file__).resolve().parents[1] / "shapes" / "tiny-shapes"
# `--model tiny-shapes-flow`: the same testbed on SD3's layout, trained as a rectified flow (`python -m shapes.pretrain_flow`)
TINY_SHAPES_FLOW = TINY_SHAPES.with_name("tiny-shapes-flow")
TESTBEDS = {"tiny-shapes": TINY_SHAPES, "tiny-shapes-flow": TINY_SHAPES_FLOW}

# LoRA targets (docs/ALGORITHMS.md §0): attention projections for every algorithm; the DRaFT variants add the
# feed-forward layers (the DRaFT paper found FF + cross-attention slightly better than attention alone).
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
FEEDFORWARD_TARGETS = ("ff.net.0.proj", "ff.net.2")

# SD1.4's noise schedule as a DDIM scheduler. Used for `tiny`; hub/local models have the same values in
# their scheduler config, which we check rather than trust.
SD14_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)


def clip_bpe() -> tuple[list[str], list[str]]:
    """The real CLIP BPE vocabulary and merges (as SD1.4's `tokenizer/`), rebuilt offline from open_clip's file.

    open_clip ships `bpe_simple_vocab_16e6.txt.gz`, the merges list OpenAI's CLIP was trained with. The
    vocabulary is derived from it exactly as CLIP does: 256 byte symbols, the same with the end-of-word
    marker, one token per merge, then the two special tokens (ids 49406, 49407). Returns (tokens in id order,
    merges as "a b" lines).
    """
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    bpe_file = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe_file).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    return vocab + ["<|startoftext|>", "<|endoftext|>"], merges


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    """The real CLIP BPE tokenizer (`clip_bpe`), as SD1.4's `tokenizer/` loads it."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe()
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[tuple(m.split()) for m in merges])
    tok.model_max_length = 77
    return tok


def tiny_unet():
    """`tiny`'s UNet (random weights): SD1.4's class, two blocks, cross-attention in one, 16×16×4 latents."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def tiny_vae(channels=(32, 64), norm_groups: int = 16, scaling_factor: float = 0.18215):
    """A 2-block AutoencoderKL (random weights): 32×32×3 images ↔ 16×16×4 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(channels),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=norm_groups,
        sample_size=32,
        scaling_factor=scaling_factor,
    )


def tiny_text_encoder():
    """A 2-layer CLIPTextModel (random weights) over the real CLIP vocabulary, hidden size 32."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def pipeline_components(unet, vae, text_encoder, dtype: torch.dtype = torch.float32) -> dict:
    """The keyword arguments of `StableDiffusionPipeline` for these modules: in `dtype`, with the real CLIP
    tokenizer and DDIM on SD1.4's schedule."""
    from diffusers import DDIMScheduler

    if dtype != torch.float32:
        unet, vae, text_encoder = unet.to(dtype), vae.to(dtype), text_encoder.to(dtype)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                scheduler=DDIMScheduler(**SD14_SCHEDULER))


def tiny_components(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """A Stable-Diffusion-shaped model small enough for a CPU: same classes as SD1.4, random weights.

    UNet with two blocks (one with cross-attention), a 2-block VAE (32×32 images ↔ 16×16×4 latents) and a
    2-layer CLIP text encoder. Deterministic from `seed`; nothing is downloaded.
    """
    torch.manual_seed(seed)
    unet = tiny_unet()
    torch.manual_seed(seed + 1)
    vae = tiny_vae()
    torch.manual_seed(seed + 2)
    return pipeline_components(unet, vae, tiny_text_encoder(), dtype)


def random_weights_(module: torch.nn.Module, seed: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Give `module`, built with its parameters on the meta device, seeded random weights in `dtype` (in place).

    Every weight of ≥ 2 dims gets U(±1/√fan_in), the distribution of PyTorch's default Linear/Conv init
    (kaiming_uniform with a = √5, see torch.nn.init); for an embedding fan_in is its width (U(±1/√768) has std
    0.021, about transformers' N(0, 0.02)). Norm scales are 1, every other 1-d parameter (biases) 0. Against the
    modules' own initialisers this allocates each tensor once, in its final dtype (building an fp16 SD1.4 adds
    2.7 GB to the process's peak memory, not float32's 4.3 GB plus the cast), draws from its own generator
    instead of torch's global one, and draws in float32 before casting, so a half-precision model is the float32
    one rounded. The CPU time is about the same (SD1.4: 5.2 s against 5.5 s on this project's machine).
    """
    generator = torch.Generator().manual_seed(seed)
    for sub in module.modules():
        # (diffusers' RMSNorm, SD3's q/k norm, is no torch norm class)
        is_norm = isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)) or type(sub).__name__ == "RMSNorm"
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            w = torch.empty(p.shape, dtype=torch.float32)
            if is_norm:
                w.fill_(1.0 if name == "weight" else 0.0)
            elif p.dim() >= 2:
                bound = (p.shape[1] * p[0, 0].numel()) ** -0.5  # fan_in = input features × kernel size
                w.uniform_(-bound, bound, generator=generator)
            else:
                w.zero_()
            sub._parameters[name] = torch.nn.Parameter(w.to(dtype), requires_grad=p.requires_grad)
    return module


SD14_CONFIGS = Path(__file__).parent / "configs" / "sd14"


def sd14_random_components(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """SD1.4's real architecture with random weights: the full-size path (LoRA names, memory, speed) offline.

    UNet (859.5 M parameters), VAE (83.7 M) and CLIP ViT-L/14 text encoder (123.1 M) from the configs of
    `CompVis/stable-diffusion-v1-4` shipped in common/configs/sd14/ (their sources: its README.md), the real CLIP
    tokenizer, and DDIM from the shipped scheduler config (SD1.4's schedule). Deterministic from `seed`.
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # Parameters on the meta device (buffers such as CLIP's position ids stay real), so nothing is allocated and
    # initialised twice: random_weights_ does both once.
    with init_empty_weights(include_buffers=False):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD14_CONFIGS / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD14_CONFIGS / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(SD14_CONFIGS / "text_encoder" / "config.json"))
    unet, vae, text_encoder = (random_weights_(m, seed + i, dtype) for i, m in enumerate((unet, vae, text_encoder)))
    components = pipeline_components(unet, vae, text_encoder)
    components["scheduler"] = DDIMScheduler.from_config(DDIMScheduler.load_config(SD14_CONFIGS / "scheduler"))
    return components


@functools.lru_cache(maxsize=1)
def t5_tokenizer():
    """`tiny-sd3`'s T5 tokenizer: T5's format (a SentencePiece unigram model behind `T5TokenizerFast`: <pad> 0, </s> 1
    appended, <unk> 2, "▁" word starts) over one piece per printable ASCII character, with and without "▁". T5's real
    32k vocabulary ships with no installed package (sentencepiece is not installed either), so this one is built in
    code: prompts tokenize the way T5's do, character by character."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)


def sd3_pipeline(transformer, vae, text_encoders, scheduler, dtype: torch.dtype = torch.float32):
    """A `StableDiffusion3Pipeline` of these modules in `dtype`: CLIP-L, CLIP-G and T5 (or None) with their tokenizers."""
    from diffusers import StableDiffusion3Pipeline

    # in eval mode, as from_pretrained returns modules (T5's dropout would make the conditioning random)
    def cast(m):  # (ModelMixin.to warns on any dtype cast, even to the dtype it has)
        return None if m is None else (m if dtype == torch.float32 else m.to(dtype)).eval()

    clip_l, clip_g, t5 = (cast(m) for m in text_encoders)
    return StableDiffusion3Pipeline(
        transformer=cast(transformer), vae=cast(vae), scheduler=scheduler,
        text_encoder=clip_l, tokenizer=clip_tokenizer(), text_encoder_2=clip_g, tokenizer_2=clip_g_tokenizer(),
        text_encoder_3=t5, tokenizer_3=None if t5 is None else t5_tokenizer())


def tiny_sd3(seed: int = 0, dtype: torch.dtype = torch.float32):
    """An SD3-shaped pipeline small enough for a CPU (a few million parameters): SD3's classes, random weights.

    A 2-layer MMDiT (`SD3Transformer2DModel`, SD3.5's dual attention and RMS q/k norm in its first layer) on
    16×16×16 latents in 2×2 patches; a 2-block VAE with 16 latent channels and SD3's scaling and shift factors
    (32×32 images); two 2-layer CLIP text encoders with projections (widths 16 and 32, so a swapped order shows) over
    the real CLIP vocabulary and a 2-layer T5 encoder of width 64 (`t5_tokenizer`); FlowMatchEuler with SD3's shift 3.
    Deterministic from `seed`; nothing is downloaded."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def clip(width):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=width, bos_token_id=49406,
            eos_token_id=49407, pad_token_id=49407))

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=48,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), latent_channels=16, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    torch.manual_seed(seed + 2)
    encoders = (clip(16), clip(32), T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer()), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)))
    return sd3_pipeline(transformer, vae, encoders, FlowMatchEulerDiscreteScheduler(shift=3.0), dtype)


SD35M_CONFIGS = Path(__file__).parent / "configs" / "sd35m"


def sd35m_random(seed: int = 0, dtype: torch.dtype = torch.float32):
    """SD3.5-Medium's real architecture with random weights, without T5 (`NO_T5`: its 4.7 B parameters would not fit
    this project's 24 GB machine in float32 beside the rest): the MMDiT (2.24 B parameters and a 0.23 B positional
    embedding buffer), the 16-channel VAE (83.8 M) and CLIP-L/CLIP-G with projections (123.7 M, 694.7 M) from the
    configs shipped in common/configs/sd35m/ (sources: its README.md), the real CLIP tokenizer, FlowMatchEuler from
    the shipped scheduler config (shift 3)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with init_empty_weights(include_buffers=False):
        transformer = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(SD35M_CONFIGS / "transformer"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD35M_CONFIGS / "vae"))
        clips = [CLIPTextModelWithProjection(CLIPTextConfig.from_json_file(SD35M_CONFIGS / name / "config.json"))
                 for name in ("text_encoder", "text_encoder_2")]
    modules = [random_weights_(m, seed + i, dtype) for i, m in enumerate((transformer, vae, *clips))]
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        FlowMatchEulerDiscreteScheduler.load_config(SD35M_CONFIGS / "scheduler"))
    return sd3_pipeline(modules[0], modules[1], (*modules[2:], None), scheduler, dtype)


def _model_index(model: str) -> dict:
    """A diffusers folder's or hub repo's model_index.json."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(model)


def _from_pretrained(model: str, dtype: torch.dtype, no_t5: bool = False):
    """The pipeline of the class the model declares, if it is a family these scripts train (else a UserError naming
    the supported ones), with that family's loading arguments."""
    import diffusers

    from .diffusion import family_of

    local = os.path.isdir(model)
    try:
        index = _model_index(model)
        name = index["_class_name"]
        room = family_of(name)  # an unsupported family is refused before any weights load
        # components saved as [null, null] (e.g. an SD3 folder written without T5): from_pretrained wants them passed
        extra = {k: None for k, v in index.items() if v == [None, None]}
        extra.update(getattr(room, "PRETRAINED_KWARGS", {}))
        if no_t5:  # SD3 without its T5 encoder (NO_T5)
            extra.update(text_encoder_3=None, tokenizer_3=None)
        return getattr(diffusers, name).from_pretrained(model, dtype=dtype, **extra)
    except (OSError, ValueError, KeyError, EnvironmentError) as e:
        where = (
            f"the local folder {model!r} is not a diffusers Stable Diffusion folder"
            if local
            else f"{model!r} could not be fetched from the Hugging Face Hub and is not in the local cache"
        )
        reason = (str(e).strip().splitlines() or [""])[0]
        raise UserError(
            f"could not load the Stable Diffusion pipeline: {where} ({type(e).__name__}: {reason}). "
            f"On a machine with network: `hf download {SD14 if local else model}` (SD1.4: about 5 GB; the cache is "
            "reused offline), or pass --model /path/to/folder with model_index.json and its components (unet/ or "
            "transformer/, vae/, the text encoders and tokenizers, scheduler/) in diffusers' format. For a CPU run "
            "without weights use --model tiny, tiny-shapes, tiny-sdxl or tiny-sd3."
        ) from e


def _sd_pipeline(components: dict):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


# --- SDXL ------------------------------------------------------------------------------------------------------------

SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_CONFIGS = Path(__file__).parent / "configs" / "sdxl"


def clip_g_tokenizer():
    """SDXL-base's `tokenizer_2`: the same CLIP BPE as `tokenizer`, padding with "!" (id 0) instead of <|endoftext|>
    (its special_tokens_map.json, shipped in common/configs/sdxl/tokenizer_2/). The padding changes text_encoder_2's
    hidden states at the padded positions, so the conditioning."""
    tok = copy.deepcopy(clip_tokenizer())
    special = json.loads((SDXL_CONFIGS / "tokenizer_2" / "special_tokens_map.json").read_text())
    tok.pad_token = special["pad_token"]
    return tok


def _sdxl_pipeline(unet, vae, text_encoder, text_encoder_2):
    """`StableDiffusionXLPipeline` with the real CLIP tokenizers, DDIM from SDXL-base's scheduler config and its
    `force_zeros_for_empty_prompt` (model_index.json)."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    index = json.loads((SDXL_CONFIGS / "model_index.json").read_text())
    scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(SDXL_CONFIGS / "scheduler"))
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_g_tokenizer(), unet=unet,
                                     scheduler=scheduler, add_watermarker=False,
                                     force_zeros_for_empty_prompt=index["force_zeros_for_empty_prompt"])


def tiny_sdxl_components(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple:
    """SDXL's classes and conditioning small enough for a CPU (random weights, deterministic from `seed`): a UNet of
    two blocks (cross-attention with 1 and 2 transformer layers in the second, linear projections, the "text_time"
    added condition: 6 time ids × 8 + the pooled 32), two 2-layer CLIP text encoders of width 32 (the second with a
    projection, as OpenCLIP bigG's), concatenated to the UNet's context width 64, and `tiny`'s VAE with SDXL's
    scaling factor and `force_upcast`. Returns (unet, vae, text_encoder, text_encoder_2)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=16,
    )
    torch.manual_seed(seed + 1)
    vae = tiny_vae(scaling_factor=0.13025)
    config = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**config, hidden_act="quick_gelu"))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config, hidden_act="gelu", projection_dim=32))
    modules = (unet, vae, text_encoder, text_encoder_2)
    return modules if dtype == torch.float32 else tuple(m.to(dtype) for m in modules)


def sdxl_random_components(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple:
    """SDXL-base's real architecture with random weights (`random_weights_`), from the configs of
    `stabilityai/stable-diffusion-xl-base-1.0` shipped in common/configs/sdxl/ (their sources: its README.md): UNet
    2,567 M parameters, VAE 83.7 M, CLIP ViT-L 123.1 M, OpenCLIP bigG 694.7 M; 13.9 GB in float32, so build it in
    bf16 on a machine of 24 GB. Returns (unet, vae, text_encoder, text_encoder_2)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights(include_buffers=False):
        modules = (
            UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_CONFIGS / "unet")),
            AutoencoderKL.from_config(AutoencoderKL.load_config(SDXL_CONFIGS / "vae")),
            CLIPTextModel(CLIPTextConfig.from_json_file(SDXL_CONFIGS / "text_encoder" / "config.json")),
            CLIPTextModelWithProjection(CLIPTextConfig.from_json_file(SDXL_CONFIGS / "text_encoder_2" /
                                                                      "config.json")),
        )
    return tuple(random_weights_(m, seed + i, dtype) for i, m in enumerate(modules))


# The --model names built offline: name → builder(seed, dtype) → pipeline (random weights, nothing downloaded). Each
# model family adds its `tiny-*` (CI) and `*-random` (its real architecture, for memory figures) here. The testbeds
# `tiny-shapes` and `tiny-shapes-flow` are folders (TESTBEDS), loaded like any local model.
BUILT_IN_MODELS = {
    "tiny": lambda seed, dtype: _sd_pipeline(tiny_components(seed, dtype)),
    "tiny-shapes": None,
    "tiny-shapes-flow": None,
    # SD1.4's architecture from its shipped configs (common/configs/sd14/), random weights: no download
    "sd14-random": lambda seed, dtype: _sd_pipeline(sd14_random_components(seed, dtype)),
    "tiny-sdxl": lambda seed, dtype: _sdxl_pipeline(*tiny_sdxl_components(seed, dtype)),
    # SDXL-base's architecture from its shipped configs (common/configs/sdxl/), random weights
    "sdxl-random": lambda seed, dtype: _sdxl_pipeline(*sdxl_random_components(seed, dtype)),
    "tiny-sd3": tiny_sd3,
    # SD3.5-Medium's architecture from its shipped configs (common/configs/sd35m/), random weights, no T5
    "sd35m-random": sd35m_random,
}


def check_model_name(model: str) -> None:
    """Refuse (UserError) a --model that is neither built in, a local folder, nor shaped like a hub id, before
    anything loads."""
    model = model.removesuffix(NO_T5)
    if model not in BUILT_IN_MODELS and not os.path.isdir(model) and model.count("/") != 1:
        raise UserError(f"unknown model {model!r}: expected one of {', '.join(BUILT_IN_MODELS)}, a hub id such as "
                        f"{SD14!r} or {SDXL!r}, or a local folder")


def set_resolution(pipe, resolution: int | None) -> None:
    """Sample at `resolution` pixels (None: the model's native size, the denoiser's `sample_size` × the VAE's factor).
    The latent side must be divisible by the UNet's total downsampling (SD1.4: 8, so multiples of 64 px) or the
    transformer's patch size (SD3: 2, so multiples of 16 px)."""
    if resolution is None:
        return
    factor, net = pipe.vae_scale_factor, denoiser(pipe)
    down = net.config.get("patch_size") or 2 ** (len(net.config.down_block_types) - 1)
    if resolution % (factor * down):
        raise UserError(f"--resolution {resolution} does not fit this model: it must be a multiple of "
                        f"{factor * down} px (VAE factor {factor} × the denoiser's downsampling {down})")
    net.register_to_config(sample_size=resolution // factor)  # what diffusers' pipelines read as the default
    if hasattr(pipe, "default_sample_size"):  # SD3's pipeline copies it at construction
        pipe.default_sample_size = resolution // factor


def load_pipeline(
    model: str = SD14,
    lora_rank: int = 4,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    lora_targets: tuple[str, ...] = ATTENTION_TARGETS,
    seed: int = 0,
    resolution: int | None = None,
):
    """A pipeline of a supported family (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`,
    `StableDiffusion3Pipeline`, by the model's model_index.json) whose denoiser carries a trainable peft LoRA adapter
    named "default".

    `model`: hub id, local diffusers folder, "tiny" (random weights), "sd14-random" (SD1.4's architecture with
    random weights), "tiny-shapes" / "tiny-shapes-flow" (the folders TESTBEDS, pretrained on the shapes testbed as
    a DDPM and as a rectified flow), "tiny-sdxl" /
    "sdxl-random" (the same for SDXL-base), "tiny-sd3" or "sd35m-random" (SD3.5-Medium's architecture with random
    weights); an SD3 model with the suffix ":no-t5" loads without its T5 text encoder (`NO_T5`). `dtype` is the
    frozen base weights' dtype (bf16/fp16 on CUDA for speed; on the CPU too, slowly, for tests); LoRA weights are
    always float32. Only LoRA parameters require grad; the VAE and text encoders are frozen. The scheduler is the
    model's own if a sampler room differentiates it (SD3's FlowMatchEuler), else DDIM on the model's noise schedule
    (timestep_spacing included; SD1.4's or SDXL's for the built-in models). `seed` only affects the built-in random
    models. `lora_targets` are SD1.x's layer names, which each family maps to its own denoiser's (`lora_targets` in
    its room).
    `resolution`: sample at this many pixels instead of the model's native size (see `set_resolution`).
    """
    from diffusers import DDIMScheduler
    from peft import LoraConfig

    device = torch.device(device)
    check_model_name(model)
    model, no_t5 = model.removesuffix(NO_T5), model.endswith(NO_T5)
    if model in TESTBEDS:
        if not TESTBEDS[model].is_dir():
            raise UserError(f"--model {model} is the testbed's folder {TESTBEDS[model]}, which is not here (a script "
                            "copied with common/ and rewards/ only?); pass --model with the path of a copy of it")
        model = str(TESTBEDS[model])
    if BUILT_IN_MODELS.get(model) is not None:
        pipe = BUILT_IN_MODELS[model](seed, dtype)
    else:
        pipe = _from_pretrained(model, dtype, no_t5)
        if type(pipe.scheduler).__name__ not in SAMPLERS:  # SD1.4 ships PNDM: DDIM on the same schedule
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        # a schedule other than SD1.4's is read from the config; a step the log-prob does not describe is refused
        check_scheduler(pipe.scheduler)
    if no_t5:
        if not hasattr(pipe, "text_encoder_3"):
            raise UserError(f"--model {model}{NO_T5}: only SD3 models have a T5 text encoder to leave out")
        pipe.register_modules(text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    set_resolution(pipe, resolution)
    for module in pipe.components.values():  # the denoiser, the VAE and every text encoder
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
            module.eval()
    if lora_rank > 0:
        # B is zero-initialised ("gaussian" inits A only), so the adapted UNet starts exactly at the base model;
        # alpha = rank makes the LoRA scale 1, the convention of diffusers' LoRA training scripts.
        config = LoraConfig(
            r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
            target_modules=list(family(pipe).lora_targets(lora_targets))
        )
        denoiser(pipe).add_adapter(config)
        for p in denoiser(pipe).parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return pipe.to(device)


def lora_parameters(pipe) -> list[torch.nn.Parameter]:
    """The trainable (LoRA) parameters of the denoiser (UNet or transformer)."""
    return [p for p in denoiser(pipe).parameters() if p.requires_grad]
