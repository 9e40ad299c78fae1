"""Spatial stream: sampled frames -> InternVL vision-tower input (448x448, ImageNet normalisation).

Split in two so the pipeline can cache the compact part: `resize` (uint8, done where frames are
decoded) and `normalize` (float, done when a batch is assembled). Together they reproduce
transformers' InternVL image processor (GotOcr2ImageProcessor, bicubic, no tiling).
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SpatialFeatures:
    def __init__(self, image_size: int = 448, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)

    def config(self) -> dict:
        return {"image_size": self.image_size, "mean": self.mean, "std": self.std, "resample": "bicubic"}

    def resize(self, frames) -> torch.Tensor:
        """uint8 [N,H,W,3] (numpy or torch) -> uint8 [N,3,S,S]."""
        frames = torch.as_tensor(np.require(frames, requirements=["C", "W"])).permute(0, 3, 1, 2)
        return F.resize(frames, [self.image_size, self.image_size], interpolation=InterpolationMode.BICUBIC,
                        antialias=True)

    def normalize(self, resized: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 3, S, S] -> float32 normalised pixel values of the same shape."""
        mean = torch.tensor(self.mean, device=resized.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=resized.device).view(3, 1, 1)
        return (resized.float() / 255 - mean) / std

    def __call__(self, frames) -> torch.Tensor:
        return self.normalize(self.resize(frames))
