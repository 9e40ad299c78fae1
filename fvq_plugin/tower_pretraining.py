"""The demo's pretrained tiny vision tower: degradation reading learned on face-free pictures from packages.

The real FVQ-Rater's vision tower is InternViT, pretrained on web-scale data. A tiny random tower that learns
low-level cues from the demo's seven training faces alone keys on how those faces look (README). So the demo's
rater starts from a tiny tower taught to read degradations on other content: random crops of the demo set's
face-free backgrounds (`demo_data.BACKGROUNDS`: textures and scenes, never a face, so no test identity is
seen), degraded at random severities with the demo's own blur, exposure, noise and rescaling
(`demo_data.degrade_frame`) and JPEG compression, while a throwaway linear head on the tower's mean token
regresses the severities (L1). The result ships as TOWER_FILE, like the feature models, so the demo spends no
time on it; `python -m fvq_plugin.tower_pretraining` remakes it (about 4 minutes on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from . import demo_data
from .errors import InputError

DEGRADATIONS = ("blur", "noise", "compression", "scaling", "exposure")
CROP_SIZE = demo_data.DEFAULT_SIZE  # the demo videos' size: the degradations' scale matches theirs
JPEG_BEST, JPEG_WORST = 95, 5
TOWER_FILE = Path(__file__).parent / "weights" / "tiny_vision_tower.safetensors"


@dataclass
class TowerPretraining:
    samples: int = 6000
    epochs: int = 60
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    held_out: float = 0.1  # crops kept aside to report how well the tower reads each degradation


def degraded_crops(samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`samples` RGB uint8 crops [N, CROP_SIZE, CROP_SIZE, 3] and their severities [N, len(DEGRADATIONS)] in [0, 1].

    Each degradation is present in half the crops, at a uniform severity; the same seed gives the same crops.
    """
    rng = np.random.default_rng(seed)
    pictures = [demo_data.load_source_image(name) for name in sorted(demo_data.BACKGROUNDS)]
    crops, severities = [], []
    for _ in range(samples):
        picture = pictures[rng.integers(len(pictures))]
        height, width = picture.shape[:2]
        side = int(rng.uniform(CROP_SIZE, min(height, width)))
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        crop = cv2.resize(picture[top:top + side, left:left + side], (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_AREA)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        drawn = {name: float(rng.uniform()) if rng.random() < 0.5 else 0.0 for name in DEGRADATIONS}
        exposure = demo_data.exposure_table(drawn["exposure"], overexposed=bool(rng.random() < 0.5))
        crop = demo_data.degrade_frame(np.ascontiguousarray(crop), drawn, exposure, rng)
        if drawn["compression"] > 0:
            quality = round(JPEG_BEST - (JPEG_BEST - JPEG_WORST) * drawn["compression"])
            encoded = cv2.imencode(".jpg", crop[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])[1]
            crop = cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1]
        crops.append(np.ascontiguousarray(crop))
        severities.append([drawn[name] for name in DEGRADATIONS])
    return np.stack(crops), np.asarray(severities, dtype=np.float32)


def pretrain_tower(tower, spatial, config: TowerPretraining | None = None, progress: bool = True) -> dict:
    """Train every weight of `tower` (an InternVLVisionModel) on `degraded_crops`, seen through `spatial` as the
    rater sees frames. Returns the SRCC per degradation between the head's estimate and the truth on held-out crops.
    """
    from scipy.stats import spearmanr

    config = config or TowerPretraining()
    device = next(tower.parameters()).device
    crops, severities = degraded_crops(config.samples, config.seed)
    pixels, targets = spatial(crops).to(device), torch.from_numpy(severities).to(device)
    held_out = int(config.samples * config.held_out)
    torch.manual_seed(config.seed)
    head = torch.nn.Linear(tower.config.hidden_size, len(DEGRADATIONS)).to(device)
    steps_per_epoch = (config.samples - held_out) // config.batch_size
    optimizer = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=config.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(config.seed)
    tower.train()
    for _ in tqdm(range(config.epochs), desc="vision tower pretraining", unit="epoch", disable=not progress):
        order = held_out + torch.randperm(config.samples - held_out, generator=generator)
        for step in range(steps_per_epoch):
            batch = order[step * config.batch_size:(step + 1) * config.batch_size].to(device)
            estimate = head(tower(pixel_values=pixels[batch]).last_hidden_state.mean(1))
            loss = torch.nn.functional.l1_loss(estimate, targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    tower.eval()
    with torch.no_grad():
        estimate = head(tower(pixel_values=pixels[:held_out]).last_hidden_state.mean(1)).cpu().numpy()
    return {name: round(float(spearmanr(estimate[:, i], severities[:held_out, i]).statistic), 4)
            for i, name in enumerate(DEGRADATIONS)}


def tiny_tower(seed: int = 0):
    """A random vision tower of the tiny InternVL that `tiny.tiny_rater` builds for the demo's frames."""
    from transformers import InternVLVisionModel

    from .demo import DEMO_FEATURES
    from .tiny import tiny_backbone_config

    torch.manual_seed(seed)
    return InternVLVisionModel(tiny_backbone_config(image_size=DEMO_FEATURES.image_size).vision_config)


def load_tower(vlm, path=TOWER_FILE) -> None:
    """Put the weights in `path` into the vision tower of `vlm` (an InternVLForConditionalGeneration)."""
    from safetensors.torch import load_file

    try:
        vlm.model.vision_tower.load_state_dict(load_file(path))
    except (OSError, RuntimeError) as error:
        raise InputError(f"cannot load the vision tower weights {path} into this model: {error}") from error


def main(argv=None) -> int:
    from safetensors.torch import save_file

    from .demo import DEMO_FEATURES
    from .features.spatial import SpatialFeatures

    parser = argparse.ArgumentParser(description="Pretrain the demo's tiny vision tower on degraded face-free crops.")
    parser.add_argument("output", nargs="?", default=str(TOWER_FILE))
    defaults = TowerPretraining()
    for name in ("samples", "epochs", "seed"):
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    args = parser.parse_args(argv)
    config = TowerPretraining(samples=args.samples, epochs=args.epochs, seed=args.seed)
    tower = tiny_tower(config.seed)
    reading = pretrain_tower(tower, SpatialFeatures(DEMO_FEATURES.image_size), config)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    save_file({name: value.contiguous() for name, value in tower.state_dict().items()}, args.output,
              metadata={"pretraining": json.dumps(asdict(config)), "held_out_srcc": json.dumps(reading)})
    print(f"wrote {args.output}; held-out SRCC per degradation: {reading}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
