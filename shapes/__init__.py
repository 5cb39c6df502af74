"""The tiny-shapes testbed: a procedural captioned data set (`shapes.data`), a Stable-Diffusion-architecture
model pretrained on it (`shapes.model`, `--model tiny-shapes`) and the classifier that judges prompt alignment
(`shapes.classifier`, rewards `shapes_alignment` / `shapes_exact_match`).

`RECOMMENDED`: the sampling settings the testbed's figures use (DDIM η = 0).
"""

RECOMMENDED = dict(num_inference_steps=20, guidance_scale=5.0)
