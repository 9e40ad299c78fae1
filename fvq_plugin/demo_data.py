"""A synthetic face-video quality dataset in the FVQ-20K layout, for demos and tests.

Every video is a smooth random pan/zoom over one face (an identity) in a photo that ships inside an
installed package, given its own look (mirrored or not, hue, saturation, white balance, a soft side
light, in half the videos another background behind the person: content, not quality) and degraded
by up to seven degradations, each with a severity s_k in [0, 1] (0 = off):

    blur         gaussian blur, sigma up to 3.5 px
    noise        additive gaussian noise, std up to 40 grey levels
    compression  H.264 at a bit rate from 256 kbit/s (s -> 0) down to 9.6 kbit/s (s = 1); crf 18 when off
    scaling      downscale by a factor up to 6, then back up
    exposure     gain and gamma, over- or under-exposed
    stutter      frame drops: up to 80% of frames repeat the previous one
    shake        camera shake: crop jitter with a std of up to 6% of the crop height

The label is a monotone decreasing function of the weighted total severity plus rater noise:

    S   = sum_k w_k * s_k        (weights in SEVERITY_WEIGHTS)
    MOS = clip(95 - 85 * S / S_max + N(0, 2), 0, 100),   S_max = 3

S is drawn uniformly from [0, S_max] per video and split over 1-4 (more when they cannot carry
it) random degradations, so MOS spans about 10..95, nearly pristine videos included.

Splits are content-disjoint: the seed assigns whole identities to splits (2 to test, 1 to val, the
rest to train), so the faces of the test split are never seen in training and its SRCC measures
what a rater does on unseen faces. The identities (licences as their packages state them):

    astronaut     scikit-image astronaut.png: Eileen Collins, NASA, public domain
    camera        scikit-image camera.png: CC0, Lav Varshney
    grace_hopper  matplotlib sample_data/grace_hopper.jpg: US Navy photograph, public domain
    kodim04       pyiqa's ResultsCalibra/ref_dir/I04.bmp: Kodak PhotoCD image kodim04 (as cropped by
                  TID2013), released by Kodak for unrestricted use
    group_1..6    insightface data/images/t1.jpg, one identity per person, each cropped inside the part
                  of the photo that shows no other face: no licence stated
(insightface's Tom_Hanks_54745.png is left out: at 112x112 px every crop of it would be upscaled.)
Backgrounds put behind the person (cut out by the portrait stream's person-segmentation model), in
half the videos of the identities: scikit-image's brick.png, grass.png and gravel.png (CC0 textures
from cc0textures.com), scikit-learn's china.jpg and flower.jpg (CC BY 2.0, danielbuechele and
vultilion on Flickr) and pyiqa's Kodak kodim03, kodim06, kodim08 and kodim19 (as above). None shows
a face, and every split draws from all of them: they vary the content, not the identities.
The no_face corner case uses scikit-image's coffee.png (CC0, Rachel Michetti), chelsea.png (CC0,
Stefan van der Walt) and rocket.jpg (NASA, public domain). Nothing is downloaded or redistributed:
the photos are read from the installed packages when the set is built.

Layout: out_dir/{train,val,test}/labels.txt ("name,mos" lines) and out_dir/{split}/videos/<name>,
split 80/5/15, plus out_dir/meta.json describing every video and the identities of every split.
The test split also holds a corner-case subset: face-free videos, several faces (the test identities
side by side), portrait orientation, and very short clips. The same seed gives the same files byte for byte.
`build_unlabeled_pool` adds out_dir/unlabeled/videos: videos of the training identities without labels,
for `fvq-rater distill` (their MOS only in out_dir/unlabeled/meta.json).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import math
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from fvq_plugin.data import SPLITS
from fvq_plugin.errors import InputError
from fvq_plugin.video import write_video

BUILDER_VERSION = 4
MARKER = ".fvq-demo-set"  # written first by every build: only folders holding it are ever replaced
SPLIT_FRACTIONS = {"train": 0.80, "val": 0.05, "test": 0.15}
# 400 videos: 320 to train on, 60 to test; a tiny rater generalises far better than from 160.
DEFAULT_VIDEOS = 400
DEFAULT_FRAMES = 48
# 128 px, not 160: crops are never upscaled, and the faces of insightface's group photo are only 159-186 px tall,
# so at 160 px they were shown near the photo's own scale, with its softness and JPEG marks, which the MOS does not
# count. At 128 px every crop of them is downscaled 1.24x or more (README: what that changed).
DEFAULT_SIZE = 128
FPS = 24.0

# out_dir/unlabeled/videos: more videos like the training split's, labels withheld (`fvq-rater distill` pseudo-labels
# them). Their indices start here, so their random streams are never a labelled video's.
UNLABELED, POOL_FIRST_INDEX = "unlabeled", 1_000_000

CORNER_CASES = ("no_face", "multi_face", "portrait", "short")
SHORT_FRAMES = 5
PORTRAIT_ASPECT = (0.8, 1.4)  # width, height as multiples of `size`: 102x180 for size 128

SEVERITY_WEIGHTS = {"blur": 1.0, "noise": 0.9, "compression": 1.0, "scaling": 0.9,
                    "exposure": 0.8, "stutter": 0.6, "shake": 0.7}
DEGRADATIONS = tuple(SEVERITY_WEIGHTS)
S_MAX = 3.0
MOS_BEST, MOS_SPAN, MOS_NOISE_STD = 95.0, 85.0, 2.0
MOS_FORMULA = (f"MOS = clip({MOS_BEST:g} - {MOS_SPAN:g} * S / S_max + N(0, {MOS_NOISE_STD:g}), 0, 100); "
               f"S = sum_k w_k * s_k over degradations k with severity s_k in [0, 1]; S_max = {S_MAX:g}")

MAX_DEGRADATIONS_DRAWN = 4
BLUR_MAX_SIGMA = 3.5
NOISE_MAX_STD = 40.0
# The bits per pixel of 400 down to 15 kbit/s at 160x160, where the set was first made.
BITRATE_BEST, BITRATE_WORST, PRISTINE_CRF = 256e3, 9.6e3, 18
SCALING_MAX_FACTOR = 6.0
EXPOSURE_MAX_GAIN_STOPS, EXPOSURE_MAX_GAMMA_STOPS = 1.6, 0.8
STUTTER_MAX_REPEAT = 0.8
SHAKE_MAX_FRACTION = 0.06

# Independent random streams per video, so a video never depends on the others or their order.
PLAN_STREAM, RENDER_STREAM, LOOK_STREAM = 0, 1, 2
IDENTITY_STREAM = -1  # the seed's one draw of identities per split, not tied to a video


@dataclasses.dataclass(frozen=True)
class Source:
    package: str
    relative_path: str
    # Region every crop must contain (x0, y0, x1, y1 as image fractions): the face(s), or the centre.
    focus: tuple[float, float, float, float]
    # Crops are at most this many focus heights tall, so a face stays prominent.
    max_zoom_out: float = math.inf
    # Region crops must stay inside: in a group photo, the part that shows no other face.
    bounds: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    # False where the face fills the image across, so no portrait-shaped crop can hold it.
    fits_portrait: bool = True

    @property
    def label(self) -> str:
        return f"{self.package}:{self.relative_path}"

    def focus_pixels(self, image_shape: tuple[int, ...]) -> np.ndarray:
        """The focus in pixels of an image of `image_shape`: x0, y0, x1, y1."""
        return _in_pixels(self.focus, image_shape)

    def bounds_pixels(self, image_shape: tuple[int, ...]) -> np.ndarray:
        """The bounds in pixels of an image of `image_shape`: x0, y0, x1, y1."""
        return _in_pixels(self.bounds, image_shape)

    def bounds_box(self, image_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """The bounds in whole pixels: x0, y0, x1, y1."""
        return tuple(int(v) for v in np.round(self.bounds_pixels(image_shape)))


def _in_pixels(region: tuple[float, float, float, float], image_shape: tuple[int, ...]) -> np.ndarray:
    height, width = image_shape[:2]
    return np.multiply(region, [width, height] * 2)


# Sources and licences: the module docstring. insightface's mask_*.jpg images are face-mask textures
# without a face, so they are not used.
_FRIENDS = ("insightface", "data/images/t1.jpg")
IDENTITIES = {
    "astronaut": Source("skimage", "data/astronaut.png", (0.32, 0.08, 0.56, 0.37), 3.5),
    "camera": Source("skimage", "data/camera.png", (0.30, 0.13, 0.52, 0.40), 3.5),
    "grace_hopper": Source("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", (0.33, 0.16, 0.72, 0.59), 2.5),
    "kodim04": Source("pyiqa", "../ResultsCalibra/ref_dir/I04.bmp", (0.36, 0.24, 0.78, 0.84), fits_portrait=False),
    "group_1": Source(*_FRIENDS, (0.03, 0.28, 0.14, 0.47), 2.2, bounds=(0.0, 0.0, 0.17, 1.0)),
    "group_2": Source(*_FRIENDS, (0.20, 0.14, 0.30, 0.33), 2.2, bounds=(0.17, 0.0, 0.325, 1.0)),
    "group_3": Source(*_FRIENDS, (0.35, 0.28, 0.46, 0.49), 2.2, bounds=(0.325, 0.0, 0.518, 1.0)),
    "group_4": Source(*_FRIENDS, (0.575, 0.37, 0.67, 0.55), 2.2, bounds=(0.518, 0.0, 0.68, 1.0)),
    "group_5": Source(*_FRIENDS, (0.69, 0.045, 0.795, 0.24), 2.2, bounds=(0.68, 0.0, 0.835, 1.0)),
    "group_6": Source(*_FRIENDS, (0.875, 0.29, 0.97, 0.47), 2.2, bounds=(0.835, 0.0, 1.0, 1.0)),
}
SCENES = {  # no face: the no_face corner case
    "coffee": Source("skimage", "data/coffee.png", (0.35, 0.35, 0.65, 0.65)),
    "chelsea": Source("skimage", "data/chelsea.png", (0.35, 0.35, 0.65, 0.65)),
    "rocket": Source("skimage", "data/rocket.jpg", (0.35, 0.35, 0.65, 0.65)),
}
SOURCES = {**IDENTITIES, **SCENES}
_KODAK = "../ResultsCalibra/ref_dir/I{:02d}.bmp"
BACKGROUNDS = {  # behind the person in BACKGROUND_SHARE of the videos; the focus is unused
    "brick": Source("skimage", "data/brick.png", (0, 0, 1, 1)),
    "grass": Source("skimage", "data/grass.png", (0, 0, 1, 1)),
    "gravel": Source("skimage", "data/gravel.png", (0, 0, 1, 1)),
    "china": Source("sklearn", "datasets/images/china.jpg", (0, 0, 1, 1)),
    "flower": Source("sklearn", "datasets/images/flower.jpg", (0, 0, 1, 1)),
    **{f"kodim{i:02d}": Source("pyiqa", _KODAK.format(i), (0, 0, 1, 1)) for i in (3, 6, 8, 19)},
}
BACKGROUND_SHARE = 0.5
# Identities per split; the rest train. Whole identities go to one split, so test faces are never seen in training.
HELD_OUT_IDENTITIES = {"test": 2, "val": 1}
# The multi_face corner case shows the test identities side by side (no photo in the packages holds only them).
GROUP = "group_of_test_identities"

# Content-preserving variation, so that a rater cannot key on an identity's photo: none of it changes the MOS.
MAX_HUE_DEGREES, MAX_SATURATION_CHANGE, MAX_WHITE_BALANCE_CHANGE, MAX_LIGHT_RAMP = 12.0, 0.25, 0.08, 0.2


@dataclasses.dataclass(frozen=True)
class Look:
    """How this video's copy of the photo looks (mirrored, colour cast, side light), not how good it is."""
    flip: bool
    hue_degrees: float
    saturation: float
    white_balance: tuple[float, float, float]  # gains on R, G, B
    light_angle: float  # radians: the direction in which a soft light ramp brightens the frame
    light_ramp: float   # brightness goes from 1 - light_ramp to 1 + light_ramp across the frame
    background: str | None = None  # a BACKGROUNDS key behind the person; None: the photo's own

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "Look":
        def uniform(limit):
            return round(float(rng.uniform(-limit, limit)), 4)

        gains = 1.0 + rng.uniform(-MAX_WHITE_BALANCE_CHANGE, MAX_WHITE_BALANCE_CHANGE, 3)
        return cls(flip=bool(rng.random() < 0.5), hue_degrees=uniform(MAX_HUE_DEGREES),
                   saturation=round(1.0 + uniform(MAX_SATURATION_CHANGE), 4),
                   white_balance=tuple(round(float(gain), 4) for gain in gains / gains.mean()),
                   light_angle=round(float(rng.uniform(0, 2 * np.pi)), 4),
                   light_ramp=round(float(rng.uniform(0, MAX_LIGHT_RAMP)), 4),
                   background=(sorted(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
                               if rng.random() < BACKGROUND_SHARE else None))

    def colour_matrix(self) -> np.ndarray:
        """RGB -> RGB: hue turn and saturation in YIQ's chroma plane, then the white balance gains."""
        to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
        angle = np.deg2rad(self.hue_degrees)
        chroma = self.saturation * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        in_yiq = np.eye(3)
        in_yiq[1:, 1:] = chroma
        return np.diag(self.white_balance) @ np.linalg.inv(to_yiq) @ in_yiq @ to_yiq

    def light_gain(self, width: int, height: int) -> np.ndarray:
        x, y = np.meshgrid(np.linspace(-1, 1, width), np.linspace(-1, 1, height))
        ramp = (x * np.cos(self.light_angle) + y * np.sin(self.light_angle)) / np.sqrt(2)
        return (1.0 + self.light_ramp * ramp)[..., None].astype(np.float32)

    def apply(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        height, width = frames[0].shape[:2]
        matrix, gain = self.colour_matrix().astype(np.float32), self.light_gain(width, height)
        looks = []
        for frame in frames:
            if self.flip:
                frame = frame[:, ::-1]
            frame = cv2.transform(frame.astype(np.float32), matrix) * gain
            looks.append(np.clip(frame + 0.5, 0, 255).astype(np.uint8))
        return looks


@dataclasses.dataclass(frozen=True)
class VideoPlan:
    index: int
    split: str
    corner_case: str | None
    source: str
    frames: int
    width: int
    height: int
    severities: dict[str, float]
    overexposed: bool
    mos_noise: float
    look: Look

    @property
    def name(self) -> str:
        return f"demo_{self.index:05d}.mp4"

    @property
    def total_severity(self) -> float:
        # Rounded so the value meta.json stores reproduces the MOS exactly.
        return round(total_severity(self.severities), 6)

    @property
    def mos(self) -> float:
        return mos_from_severity(self.total_severity, self.mos_noise)


def total_severity(severities: dict[str, float]) -> float:
    return sum(SEVERITY_WEIGHTS[name] * severity for name, severity in severities.items())


def mos_from_severity(total: float, noise: float = 0.0) -> float:
    """The MOS formula (see the module docstring), rounded to the 2 decimals labels.txt holds."""
    return round(float(np.clip(MOS_BEST - MOS_SPAN * total / S_MAX + noise, 0.0, 100.0)), 2)


def split_sizes(n_videos: int) -> dict[str, int]:
    """Videos per split: 80/5/15 of n_videos, rounded half up, every split non-empty."""
    if n_videos < len(SPLITS):
        raise InputError(f"need at least {len(SPLITS)} videos to fill {SPLITS}, got {n_videos}")
    val = max(1, math.floor(n_videos * SPLIT_FRACTIONS["val"] + 0.5))
    test = max(1, math.floor(n_videos * SPLIT_FRACTIONS["test"] + 0.5))
    return {"train": n_videos - val - test, "val": val, "test": test}


def source_path(source: Source) -> Path:
    # find_spec gives the package's __file__ without importing it (insightface takes ~1 s to import).
    spec = importlib.util.find_spec(source.package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"demo source image {source.label}: package {source.package!r} is not installed")
    path = Path(spec.origin).parent / source.relative_path
    if not path.is_file():
        raise FileNotFoundError(f"demo source image {source.label} not found at {path}")
    return path


def load_source_image(key: str) -> np.ndarray:
    """The source (or background) image as RGB uint8 (grey images get three equal channels)."""
    source = SOURCES.get(key) or BACKGROUNDS[key]
    path = source_path(source)
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"demo source image {source.label} at {path} could not be decoded")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class Backdrops:
    """An identity's photo with another background behind its person, as a Look asks.

    The person matte comes from the portrait stream's segmentation model, once per identity, over
    the part of the photo its crops may show; the background image covers that part (scaled, centred).
    """

    def __init__(self):
        self._portrait, self._mattes, self._backgrounds = None, {}, {}

    def apply(self, plan: "VideoPlan", image: np.ndarray) -> np.ndarray:
        if plan.look.background is None:
            return image
        x0, y0, x1, y1 = IDENTITIES[plan.source].bounds_box(image.shape)
        region = image[y0:y1, x0:x1]
        matte = self._matte(plan.source, region)
        background = self._cover(plan.look.background, region.shape[1], region.shape[0])
        composed = image.copy()
        composed[y0:y1, x0:x1] = cv2.blendLinear(region, background, matte, 1.0 - matte)
        return composed

    def _matte(self, name: str, region: np.ndarray) -> np.ndarray:
        if name not in self._mattes:
            from fvq_plugin.features.portrait import PortraitFeatures

            self._portrait = self._portrait or PortraitFeatures()
            # The model takes a square: a tall strip of a group photo, stretched, loses its people's outlines.
            height, width = region.shape[:2]
            side = max(height, width)
            top, left = (side - height) // 2, (side - width) // 2
            square = cv2.copyMakeBorder(region, top, side - height - top, left, side - width - left, cv2.BORDER_CONSTANT)
            self._mattes[name] = self._portrait.matte(square[None])[0, top:top + height, left:left + width]
        return self._mattes[name]

    def _cover(self, name: str, width: int, height: int) -> np.ndarray:
        if name not in self._backgrounds:
            self._backgrounds[name] = load_source_image(name)
        background = self._backgrounds[name]
        scale = max(width / background.shape[1], height / background.shape[0])
        scaled = cv2.resize(background, (math.ceil(background.shape[1] * scale), math.ceil(background.shape[0] * scale)),
                            interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        top, left = (scaled.shape[0] - height) // 2, (scaled.shape[1] - width) // 2
        return np.ascontiguousarray(scaled[top:top + height, left:left + width])


def _video_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, stream])


def _even(value: float) -> int:
    return 2 * max(1, round(value / 2))


def _split_total(total: float, caps: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Split `total` in proportion to `shares` with no part above its cap (needs sum(caps) >= total)."""
    parts = np.zeros_like(caps)
    while total - parts.sum() > 1e-9:
        free = parts < caps
        parts[free] += (total - parts.sum()) * shares[free] / shares[free].sum()
        parts = np.minimum(parts, caps)
    return parts


def _draw_severities(rng: np.random.Generator) -> dict[str, float]:
    target = rng.uniform(0.0, S_MAX)
    order = [DEGRADATIONS[i] for i in rng.permutation(len(DEGRADATIONS))]
    weights = np.array([SEVERITY_WEIGHTS[name] for name in order])
    count = int(rng.integers(1, MAX_DEGRADATIONS_DRAWN + 1))
    while weights[:count].sum() < target:
        count += 1
    contributions = _split_total(target, weights[:count], rng.dirichlet(np.ones(count)))
    severities = dict.fromkeys(DEGRADATIONS, 0.0)
    for name, contribution, weight in zip(order, contributions, weights):
        severities[name] = round(float(contribution / weight), 4)
    return severities


def assign_identities(seed: int) -> dict[str, tuple[str, ...]]:
    """Which identities each split shows: HELD_OUT_IDENTITIES of them in test and val, the rest in train.

    The test split needs an identity that fits a portrait crop (its portrait corner case); draws that
    give it none are redrawn.
    """
    rng = np.random.default_rng([seed, IDENTITY_STREAM % 2**32])
    names = sorted(IDENTITIES)
    while True:
        order = [names[i] for i in rng.permutation(len(names))]
        test, val = HELD_OUT_IDENTITIES["test"], HELD_OUT_IDENTITIES["val"]
        splits = {"train": order[test + val:], "val": order[test:test + val], "test": order[:test]}
        if any(IDENTITIES[name].fits_portrait for name in splits["test"]):
            return {split: tuple(sorted(members)) for split, members in splits.items()}


def _plan_video(index: int, split: str, corner_case: str | None, source: str, seed: int,
                frames: int, size: int) -> VideoPlan:
    rng = _video_rng(seed, index, PLAN_STREAM)
    look = Look.draw(_video_rng(seed, index, LOOK_STREAM))
    if source not in IDENTITIES:  # scenes have no person, the composed group keeps its own edges
        look = dataclasses.replace(look, background=None)
    width, height = size, size
    if corner_case == "portrait":
        width, height = (_even(size * factor) for factor in PORTRAIT_ASPECT)
    return VideoPlan(
        index=index, split=split, corner_case=corner_case, source=source,
        frames=SHORT_FRAMES if corner_case == "short" else frames, width=width, height=height,
        severities=_draw_severities(rng), overexposed=bool(rng.random() < 0.5),
        mos_noise=round(float(rng.normal(0.0, MOS_NOISE_STD)), 4),
        look=look)


def _slot_sources(slots: list[tuple[str, str | None]], identities: dict[str, tuple[str, ...]]) -> list[str]:
    """The source of every slot: each split's identities in turn, so every identity gets a fair share."""
    choices = {(split, None): identities[split] for split in SPLITS}
    choices.update({("test", "short"): identities["test"], ("test", "no_face"): tuple(SCENES),
                    ("test", "multi_face"): (GROUP,),
                    ("test", "portrait"): tuple(name for name in identities["test"] if IDENTITIES[name].fits_portrait)})
    used = dict.fromkeys(choices, 0)
    sources = []
    for slot in slots:
        sources.append(choices[slot][used[slot] % len(choices[slot])])
        used[slot] += 1
    return sources


def plan_videos(n_videos: int, seed: int, frames: int = DEFAULT_FRAMES, size: int = DEFAULT_SIZE,
                corner_cases_per_kind: int = 2) -> list[VideoPlan]:
    """Decide split, corner case, source, look, size and degradations of every video (no pixels yet)."""
    corner_cases = [kind for kind in CORNER_CASES for _ in range(corner_cases_per_kind)]
    minimum = next(n for n in itertools.count(len(SPLITS)) if split_sizes(n)["test"] > len(corner_cases))
    if n_videos < minimum:
        raise InputError(f"{n_videos} videos are too few: the test split needs {len(corner_cases)} corner cases plus "
                         f"a normal video, so the minimum is {minimum} videos")
    sizes = split_sizes(n_videos)
    normal_test = sizes["test"] - len(corner_cases)
    slots = ([("train", None)] * sizes["train"] + [("val", None)] * sizes["val"]
             + [("test", kind) for kind in corner_cases] + [("test", None)] * normal_test)
    sources = _slot_sources(slots, assign_identities(seed))
    # Shuffled so that a video's name tells nothing about its split.
    order = np.random.default_rng(seed).permutation(n_videos)
    return [_plan_video(index, *slots[slot], sources[slot], seed=seed, frames=frames, size=size)
            for index, slot in enumerate(order)]


def _centre_bounds(crop: np.ndarray, focus_lo: float, focus_hi: float, lo: float, hi: float):
    """Range of crop centres along one axis that keep the crop inside [lo, hi] and the focus inside the crop."""
    return np.maximum(lo + crop / 2, focus_hi - crop / 2), np.minimum(hi - crop / 2, focus_lo + crop / 2)


def _crop_windows(image_shape: tuple[int, ...], source: Source, plan: VideoPlan,
                  rng: np.random.Generator) -> np.ndarray:
    """Per frame (centre x, centre y, height) of the crop: an eased pan/zoom between two random
    windows that hold the focus, plus shake jitter."""
    aspect = plan.width / plan.height
    fx0, fy0, fx1, fy1 = source.focus_pixels(image_shape)
    bx0, by0, bx1, by1 = source.bounds_pixels(image_shape)
    # Never upscale: a crop with fewer pixels than the video would blur content its MOS calls pristine.
    min_h = max(fy1 - fy0, (fx1 - fx0) / aspect, plan.height)
    max_h = min(by1 - by0, (bx1 - bx0) / aspect, source.max_zoom_out * (fy1 - fy0))
    if min_h > max_h:
        raise ValueError(f"{source.label}: no {plan.width}x{plan.height} crop holds its focus region")

    def centre_ranges(crop_h):
        return _centre_bounds(crop_h * aspect, fx0, fx1, bx0, bx1), _centre_bounds(crop_h, fy0, fy1, by0, by1)

    def random_window():
        crop_h = rng.uniform(min_h, max_h)
        (x_lo, x_hi), (y_lo, y_hi) = centre_ranges(crop_h)
        return np.array([rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi), crop_h])

    start = random_window()
    # The farthest of a few candidates: where the crop has little room, a single draw can land so close to the
    # start that heavy blur and compression freeze the picture, which would read as stutter the MOS does not count.
    end = max((random_window() for _ in range(3)), key=lambda window: np.abs(window - start).sum())
    t = np.linspace(0.0, 1.0, plan.frames)
    # Half linear, half cosine ease: smooth, yet every frame moves.
    progress = 0.5 * t + 0.25 * (1.0 - np.cos(np.pi * t))
    windows = start + (end - start) * progress[:, None]
    # Both constraints are linear in the window, so the path between two valid windows stays valid;
    # the shake is clipped back into them.
    jitter = rng.normal(0.0, SHAKE_MAX_FRACTION * plan.severities["shake"], (plan.frames, 2))
    (x_lo, x_hi), (y_lo, y_hi) = centre_ranges(windows[:, 2])
    windows[:, 0] = np.clip(windows[:, 0] + jitter[:, 0] * windows[:, 2], x_lo, x_hi)
    windows[:, 1] = np.clip(windows[:, 1] + jitter[:, 1] * windows[:, 2], y_lo, y_hi)
    return windows


def _render_crops(image: np.ndarray, windows: np.ndarray, width: int, height: int) -> list[np.ndarray]:
    # Shrinking the image once to the output scale of a middle zoom keeps the per-frame bilinear
    # warp within a small factor of 1, where it neither aliases nor blurs much.
    prescale = min(1.0, height / math.sqrt(windows[:, 2].min() * windows[:, 2].max()))
    if prescale < 1.0:
        image = cv2.resize(image, None, fx=prescale, fy=prescale, interpolation=cv2.INTER_AREA)
    crops = []
    for centre_x, centre_y, crop_h in windows * prescale:
        scale = height / crop_h
        left, top = centre_x - crop_h * width / height / 2, centre_y - crop_h / 2
        transform = np.array([[scale, 0.0, -left * scale], [0.0, scale, -top * scale]])
        crops.append(cv2.warpAffine(image, transform, (width, height), flags=cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_REFLECT_101))
    return crops


def exposure_table(severity: float, overexposed: bool) -> np.ndarray:
    direction = 1.0 if overexposed else -1.0
    gain = 2.0 ** (direction * EXPOSURE_MAX_GAIN_STOPS * severity)
    gamma = 2.0 ** (-direction * EXPOSURE_MAX_GAMMA_STOPS * severity)
    levels = np.arange(256) / 255.0
    return np.clip(255.0 * gain * levels ** gamma + 0.5, 0, 255).astype(np.uint8)


def degrade_frame(frame: np.ndarray, severities: dict[str, float], exposure: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    """Capture-side degradations in camera order: optics, exposure (an `exposure_table`), sensor noise, then
    rescaling. Compression, stutter and shake act on the whole video, elsewhere."""
    height, width = frame.shape[:2]
    if severities["blur"] > 0:
        frame = cv2.GaussianBlur(frame, (0, 0), BLUR_MAX_SIGMA * severities["blur"])
    frame = cv2.LUT(frame, exposure)
    if severities["noise"] > 0:
        noise = rng.standard_normal(frame.shape, dtype=np.float32) * (NOISE_MAX_STD * severities["noise"])
        frame = np.clip(frame + noise, 0, 255).astype(np.uint8)
    if severities["scaling"] > 0:
        factor = 1.0 + (SCALING_MAX_FACTOR - 1.0) * severities["scaling"]
        small = (max(1, round(width / factor)), max(1, round(height / factor)))
        frame = cv2.resize(cv2.resize(frame, small, interpolation=cv2.INTER_AREA),
                           (width, height), interpolation=cv2.INTER_LINEAR)
    return frame


def _stutter_indices(frames: int, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Which frame is shown at each time step: a dropped frame repeats the last one shown."""
    repeat = rng.random(frames) < STUTTER_MAX_REPEAT * severity
    repeat[0] = False
    return np.maximum.accumulate(np.where(repeat, 0, np.arange(frames)))


def _encoder_settings(severity: float) -> dict[str, int]:
    if severity == 0:
        return {"crf": PRISTINE_CRF}
    return {"bit_rate": round(BITRATE_BEST * (BITRATE_WORST / BITRATE_BEST) ** severity)}


def compose_group(names: tuple[str, ...], images: dict[str, np.ndarray]) -> tuple[Source, np.ndarray]:
    """The identities `names` side by side at one face height, and a source whose focus holds every face.

    The canvas is as tall as the row of faces is wide, so a square crop holds them all; where a photo
    has too little context above or below its face, its edge rows are repeated (never mirrored: no extra face).
    """
    face_height, margin = 80, 0.5  # face heights of context kept around each face
    parts, focus = [], []
    for name in names:
        source, image = IDENTITIES[name], images[name]
        fx0, fy0, fx1, fy1 = source.focus_pixels(image.shape)
        bx0, by0, bx1, by1 = source.bounds_pixels(image.shape)
        pad = margin * (fy1 - fy0)
        x0, y0 = round(max(bx0, fx0 - pad)), round(max(by0, fy0 - pad))
        x1, y1 = round(min(bx1, fx1 + pad)), round(min(by1, fy1 + pad))
        scale = face_height / (fy1 - fy0)
        offset = sum(part.shape[1] for part in parts)
        parts.append(cv2.resize(image[y0:y1, x0:x1], (round((x1 - x0) * scale), round((y1 - y0) * scale)),
                                interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR))
        focus.append([offset + (fx0 - x0) * scale, (fy0 - y0) * scale, offset + (fx1 - x0) * scale, (fy1 - y0) * scale])
    focus = np.array(focus)
    width = sum(part.shape[1] for part in parts)
    height = max(width, *(part.shape[0] for part in parts))
    padded = []
    for part, box in zip(parts, focus):
        above = (height - part.shape[0]) // 2
        padded.append(cv2.copyMakeBorder(part, above, height - part.shape[0] - above, 0, 0, cv2.BORDER_REPLICATE))
        box[[1, 3]] += above
    group = np.hstack(padded)
    corners = (*focus[:, :2].min(axis=0), *focus[:, 2:].max(axis=0))
    fractions = tuple(float(value) for value in np.divide(corners, [width, height] * 2))
    return Source("composite", "+".join(names), fractions), group


def render_video(plan: VideoPlan, seed: int, path: Path, source: Source, image: np.ndarray) -> None:
    """Write the video `plan` describes, from its source image (RGB uint8), to `path`."""
    rng = _video_rng(seed, plan.index, RENDER_STREAM)
    windows = _crop_windows(image.shape, source, plan, rng)
    exposure = exposure_table(plan.severities["exposure"], plan.overexposed)
    crops = _render_crops(image, windows, plan.width, plan.height)
    frames = [degrade_frame(crop, plan.severities, exposure, rng) for crop in plan.look.apply(crops)]
    shown = _stutter_indices(plan.frames, plan.severities["stutter"], rng)
    write_video(path, (frames[i] for i in shown), fps=FPS, **_encoder_settings(plan.severities["compression"]))


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True (--overwrite) to replace the demo set there")
        # Only a folder a build marked as its own is ever emptied: pointed at a real dataset by
        # mistake, the demo refuses instead of deleting it.
        if not (out_dir / MARKER).is_file():
            raise FileExistsError(f"{out_dir} holds files that are not a demo set written by fvq-rater (no {MARKER} "
                                  "marker); refusing to replace them: choose another folder")
        for split in (*SPLITS, UNLABELED):
            shutil.rmtree(out_dir / split, ignore_errors=True)
        (out_dir / "meta.json").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).write_text("a demo set written by fvq-rater; `fvq-rater demo` may replace this folder\n")
    for split in SPLITS:
        (out_dir / split / "videos").mkdir(parents=True, exist_ok=True)


def _load_sources(plans: list[VideoPlan], identities: dict[str, tuple[str, ...]]) -> dict[str, tuple[Source, np.ndarray]]:
    """Source and RGB image of every source the plans use, the composed group of test identities included."""
    names = {plan.source for plan in plans}
    needed = sorted(names - {GROUP} | (set(identities["test"]) if GROUP in names else set()))
    images = {name: load_source_image(name) for name in needed}
    sources = {name: (SOURCES[name], images[name]) for name in names - {GROUP}}
    if GROUP in names:
        sources[GROUP] = compose_group(identities["test"], images)
    return sources


def _shown_identities(plan: VideoPlan, identities: dict[str, tuple[str, ...]]) -> list[str]:
    if plan.source == GROUP:
        return list(identities["test"])
    return [plan.source] if plan.source in IDENTITIES else []


def _video_meta(plan: VideoPlan, identities: dict[str, tuple[str, ...]], source: Source) -> dict:
    return {
        "name": plan.name, "split": plan.split, "source": source.label, "identities": _shown_identities(plan, identities),
        "look": dataclasses.asdict(plan.look), "corner_case": plan.corner_case, "severities": plan.severities,
        "exposure_direction": "over" if plan.overexposed else "under",
        "total_severity": plan.total_severity,
        "mos_inputs": {"S": plan.total_severity, "S_max": S_MAX, "noise": plan.mos_noise},
        "mos": plan.mos, "frames": plan.frames, "size": [plan.width, plan.height], "fps": FPS,
    }


def _write_labels_and_meta(out_dir: Path, plans: list[VideoPlan], seed: int,
                           identities: dict[str, tuple[str, ...]], videos: list[dict]) -> None:
    for split in SPLITS:
        lines = [f"{plan.name},{plan.mos:.2f}\n" for plan in plans if plan.split == split]
        (out_dir / split / "labels.txt").write_text("".join(lines))
    meta = {"builder_version": BUILDER_VERSION, "seed": seed, "mos_formula": MOS_FORMULA,
            "severity_weights": SEVERITY_WEIGHTS,
            "identities": {split: list(identities[split]) for split in SPLITS},
            "identity_sources": {name: IDENTITIES[name].label for name in sorted(IDENTITIES)},
            "background_sources": {name: source.label for name, source in sorted(BACKGROUNDS.items())},
            "videos": videos}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def _summarize(videos: list[dict], out_dir: Path, seed: int, elapsed_s: float) -> dict:
    """Per-split counts, corner cases and MOS range, from the per-video entries of meta.json."""
    splits = {}
    for split in SPLITS:
        members = [video for video in videos if video["split"] == split]
        mos = np.array([video["mos"] for video in members])
        splits[split] = {
            "count": len(members),
            "identities": sorted({name for video in members for name in video["identities"]}),
            "corner_cases": {kind: sum(video["corner_case"] == kind for video in members) for kind in CORNER_CASES},
            "mos_min": float(mos.min()), "mos_mean": round(float(mos.mean()), 2), "mos_max": float(mos.max()),
        }
    size_bytes = sum(path.stat().st_size for path in out_dir.rglob("*") if path.is_file())
    return {"out_dir": str(out_dir), "n_videos": len(videos), "seed": seed, "splits": splits,
            "size_bytes": size_bytes, "elapsed_s": None if elapsed_s is None else round(elapsed_s, 2)}


def load_summary(out_dir, n_videos: int, seed: int) -> dict | None:
    """The summary of a demo set already built in `out_dir` with these parameters, else None.

    meta.json is written after the last video, so its presence means the build completed.
    """
    out_dir = Path(out_dir)
    try:
        meta = json.loads((out_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    videos = meta.get("videos", [])
    if meta.get("builder_version") != BUILDER_VERSION or meta.get("seed") != seed or len(videos) != n_videos:
        return None
    return _summarize(videos, out_dir, seed, elapsed_s=None)


def build_demo_set(out_dir, n_videos: int = DEFAULT_VIDEOS, seed: int = 0, progress: bool = True, *,
                   frames: int = DEFAULT_FRAMES, size: int = DEFAULT_SIZE,
                   corner_cases_per_kind: int = 2, overwrite: bool = False) -> dict:
    """Write a synthetic FVQ-20K-layout demo set into `out_dir` and return its summary.

    `frames` per normal video (corner "short" videos get 5) and `size` (square side; portrait
    videos are 0.8 x 1.4 of it) are for quick test sets. The summary holds per split the video
    count, corner cases and MOS min/mean/max, plus the size on disk and elapsed seconds.
    """
    if frames <= SHORT_FRAMES:
        raise ValueError(f"frames must exceed the {SHORT_FRAMES} of the 'short' corner case, got {frames}")
    if size % 2:
        raise ValueError(f"size must be even for H.264 (yuv420p), got {size}")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    plans = plan_videos(n_videos, seed, frames, size, corner_cases_per_kind)
    _prepare_out_dir(out_dir, overwrite)
    identities = assign_identities(seed)
    sources, backdrops = _load_sources(plans, identities), Backdrops()
    for plan in tqdm(plans, desc="demo videos", unit="video", disable=not progress):
        source, image = sources[plan.source]
        render_video(plan, seed, out_dir / plan.split / "videos" / plan.name, source, backdrops.apply(plan, image))
    videos = [_video_meta(plan, identities, sources[plan.source][0]) for plan in plans]
    _write_labels_and_meta(out_dir, plans, seed, identities, videos)
    return _summarize(videos, out_dir, seed, time.perf_counter() - start)


def build_unlabeled_pool(out_dir, n_videos: int, seed: int = 0, progress: bool = True, *,
                         frames: int = DEFAULT_FRAMES, size: int = DEFAULT_SIZE) -> Path:
    """Add `n_videos` videos built like the training split's (its identities, looks and degradations) in
    out_dir/unlabeled/videos and return that folder. No labels.txt: their MOS is kept only in
    out_dir/unlabeled/meta.json, to measure pseudo-labels against. The test and val identities stay unseen.
    A pool already there with the same parameters is reused."""
    out_dir = Path(out_dir)
    pool, meta_file = out_dir / UNLABELED, out_dir / UNLABELED / "meta.json"
    if not (out_dir / MARKER).is_file():
        raise InputError(f"{out_dir} is not a demo set: build it first (fvq-rater make-demo-data {out_dir})")
    wanted = {"builder_version": BUILDER_VERSION, "seed": seed, "count": n_videos, "frames": frames, "size": size}
    try:
        if {k: v for k, v in json.loads(meta_file.read_text()).items() if k in wanted} == wanted:
            return pool / "videos"
    except (OSError, ValueError):
        pass
    shutil.rmtree(pool, ignore_errors=True)
    (pool / "videos").mkdir(parents=True)
    identities = assign_identities(seed)
    train = identities["train"]
    plans = [_plan_video(POOL_FIRST_INDEX + i, UNLABELED, None, train[i % len(train)], seed, frames, size)
             for i in range(n_videos)]
    sources, backdrops = {name: (SOURCES[name], load_source_image(name)) for name in train}, Backdrops()
    for plan in tqdm(plans, desc="unlabeled pool", unit="video", disable=not progress):
        source, image = sources[plan.source]
        render_video(plan, seed, pool / "videos" / plan.name, source, backdrops.apply(plan, image))
    videos = [_video_meta(plan, identities, sources[plan.source][0]) for plan in plans]
    meta_file.write_text(json.dumps({**wanted, "note": "labels withheld: these MOS are for checking pseudo-labels only",
                                     "videos": videos}, indent=1) + "\n")
    return pool / "videos"


def format_summary(summary: dict) -> str:
    """A short table of a build_demo_set summary."""
    rows = [f"{'split':<6} {'videos':>6} {'faces':>6} {'corner':>6} {'MOS min':>8} {'mean':>6} {'max':>6}"]
    for split, stats in summary["splits"].items():
        rows.append(f"{split:<6} {stats['count']:>6} {len(stats['identities']):>6} {sum(stats['corner_cases'].values()):>6} "
                    f"{stats['mos_min']:>8.2f} {stats['mos_mean']:>6.2f} {stats['mos_max']:>6.2f}")
    corner = ", ".join(f"{kind} {count}" for kind, count in summary["splits"]["test"]["corner_cases"].items())
    rows.append(f"test corner cases: {corner}")
    rows.append("faces: identities per split; no identity is in two splits")
    rows.append(f"{summary['n_videos']} videos (seed {summary['seed']}), "
                f"{summary['size_bytes'] / 1e6:.1f} MB in {summary['out_dir']}"
                + ("" if summary["elapsed_s"] is None else f", built in {summary['elapsed_s']:.1f} s"))
    return "\n".join(rows)
