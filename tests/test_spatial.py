import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from transformers import GotOcr2ImageProcessor

from fvq_plugin.features.spatial import IMAGENET_MEAN, IMAGENET_STD, SpatialFeatures


@pytest.mark.parametrize("size", [448, 64])
def test_matches_the_transformers_internvl_image_processor(size):
    frames = np.stack([data.astronaut(), data.astronaut()[::-1].copy()])  # 512x512 RGB, a real face
    reference = GotOcr2ImageProcessor(size={"height": size, "width": size}, image_mean=list(IMAGENET_MEAN),
                                      image_std=list(IMAGENET_STD), crop_to_patches=False)
    expected = reference(images=list(frames), return_tensors="pt").pixel_values
    ours = SpatialFeatures(size)(frames)
    assert ours.shape == expected.shape == (2, 3, size, size)
    assert torch.allclose(ours, expected, atol=1e-5)


def test_resize_is_uint8_and_normalize_maps_mean_colour_to_zero():
    spatial = SpatialFeatures(32)
    frame = np.asarray(Image.fromarray(data.coffee()).resize((96, 64)))[None]
    resized = spatial.resize(frame)
    assert resized.dtype == torch.uint8 and resized.shape == (1, 3, 32, 32)
    mean_colour = torch.tensor([round(255 * m) for m in IMAGENET_MEAN], dtype=torch.uint8).view(1, 3, 1, 1)
    assert spatial.normalize(mean_colour.expand(1, 3, 4, 4)).abs().max() < 0.01
