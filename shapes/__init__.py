"""The tiny-shapes testbed: a procedural captioned data set (`shapes.data`), a Stable-Diffusion-architecture
model pretrained on it (`shapes.pretrain`; `--model tiny-shapes` is its diffusers folder `shapes/tiny-shapes/`), its
SD3-architecture rectified-flow twin (`shapes.pretrain_flow`; `--model tiny-shapes-flow`, `shapes/tiny-shapes-flow/`) and
the classifier that judges prompt alignment (`shapes.classifier`, rewards `shapes_alignment` / `shapes_exact_match`).

`RECOMMENDED`: the sampling settings the testbed's figures use (DDIM η = 0, 20 steps, SD's w = 7.5). Measured with
`python -m shapes.evaluate` on the committed weights (`weights/base_eval.json`, 4 seeds per prompt): exact match
(all four attributes as the prompt says) 22.9% on the 96 training captions and 14.6% on the 24 held-out ones;
per attribute (train) shape 82%, colour 64%, background 48%, count 60%.
"""

RECOMMENDED = dict(num_inference_steps=20, guidance_scale=7.5)

# tiny-shapes-flow's: its Euler ODE at the same 20 steps, w = 7.0 (StableDiffusion3Pipeline's default guidance_scale;
# chosen before measuring, as RECOMMENDED took SD's 7.5). Measured the same way (`weights/base_eval_flow.json`).
RECOMMENDED_FLOW = dict(num_inference_steps=20, guidance_scale=7.0)


def recommended(model: str) -> dict:
    """The sampling settings of a testbed model's figures: RECOMMENDED_FLOW for `tiny-shapes-flow`, else RECOMMENDED."""
    return dict(RECOMMENDED_FLOW if model == "tiny-shapes-flow" else RECOMMENDED)
