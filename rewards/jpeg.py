"""JPEG (in)compressibility: DDPO's file-size reward and DRaFT's differentiable stand-in."""

import io

import torch

from ._base import Reward


class JpegSize(Reward):
    """DDPO's reward: the size of the image saved by PIL as JPEG at quality 95, in kB (bytes / 1000).

    `sign=-1` is `jpeg_compressibility` (smaller files score higher), `sign=+1` is
    `jpeg_incompressibility`. The encoder is not differentiable: for the RL algorithms only."""

    differentiable = False

    def __init__(self, sign: float, quality: int = 95):
        super().__init__()
        self.sign, self.quality = sign, quality
        self.freeze()

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        from PIL import Image

        pixels = (images.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        sizes = []
        for pixel in pixels:
            buffer = io.BytesIO()
            Image.fromarray(pixel).save(buffer, format="JPEG", quality=self.quality)
            sizes.append(buffer.tell() / 1000)
        return self.sign * torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegDistortion(Reward):
    """DRaFT's differentiable compressibility: how much a differentiable JPEG round trip changes the image.

    `r = sign * mean over C,H,W of ((x - JPEG(x)) * 255)^2` with kornia's `jpeg_codec_differentiable` at
    quality 50 (libjpeg's unscaled standard quantization tables, a middle setting where smooth images
    survive almost intact and textured ones do not). `sign=-1` is `jpeg_compressibility_diff` (images that
    JPEG reproduces well score higher), `sign=+1` is `jpeg_incompressibility_diff`. The mean over pixels
    (not the sum) keeps the scale independent of the resolution: 32x32 test images and 512x512 SD samples
    give comparable numbers. kornia pads H and W to multiples of 16 internally (replicating the border) and
    crops back, so any size works."""

    def __init__(self, sign: float, quality: float = 50.0):
        super().__init__()
        self.sign, self.quality = sign, quality
        self.freeze()

    def forward(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        from kornia.enhance import jpeg_codec_differentiable

        x = images.float()
        decoded = jpeg_codec_differentiable(x, torch.tensor([self.quality], device=x.device))
        return self.sign * ((x - decoded) * 255).pow(2).mean(dim=(1, 2, 3))
