"""The tiny-shapes testbed: a procedural captioned data set (`shapes.data`), a Stable-Diffusion-architecture
model pretrained on it (`shapes.model`, `--model tiny-shapes`) and the classifier that judges prompt alignment
(`shapes.classifier`, rewards `shapes_alignment` / `shapes_exact_match`).

`RECOMMENDED`: the sampling settings the testbed's figures use (DDIM η = 0). Measured with
`python -m shapes.evaluate` on the committed weights (exact match on TRAIN_PROMPTS, 96 prompts × 1-2 seeds):
w = 2: 1%, w = 4: 2%, w = 7.5: 3%, w = 12: 3% at 20 steps; w = 7.5 at 50 steps: 4%. The pretrained model is
undertrained (1200 UNet steps); 20 steps and SD's w = 7.5 keep the sampler cheap at nearly the best rate.
"""

RECOMMENDED = dict(num_inference_steps=20, guidance_scale=7.5)
