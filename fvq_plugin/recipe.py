"""Recipes: every convention a checkpoint's scores depend on, stated in its config.

A checkpoint is only meaningful with the prompt, module structures, read-out position and
preprocessing it was trained with. The FVQ-Rater authors released weights but no code, so none of
these may be guessed in code: each is a field here, saved in `fvq_rater.json`, validated on load
(unknown keys and values are errors) and honoured by the model, the prompt and the feature pipeline.

Two recipes ship:
  finevq  FineVQ's published layout (IntMeGroup/FineVQ, the same group's previous model):
          InternVL2-8B with the internlm2-chat template, `Frame{i}: <image>` lines, a one-token motion
          slot, LayerNorm-MLP projectors, a 5-layer ReLU score head read at the token before the level
          word, SlowFast over all frames at 448 px, level bins between the training set's min and max.
  fvq     the default for training: FineVQ's conventions wherever FVQ-Rater's published figure does not
          say otherwise (its authors most likely kept them); the figure adds the portrait, face (unit-length
          embeddings, as insightface's `normed_embedding`) and temporal projectors and the stage-II
          answer "The score is", after which the score is read.
A JSON file with these fields (`--recipe-file`) matches another layout, e.g. the real FVQ-Rater's once
its files are seen, without a code change.
"""
from __future__ import annotations

import dataclasses
import json
import string
from dataclasses import dataclass
from pathlib import Path

from .common import STREAMS
from .errors import InputError

SLOT = "<slot>"
# InternVL's `internlm2-chat` conversation template (InternVL conversation.py, as FineVQ copies it).
INTERNVL_SYSTEM_MESSAGE = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
CHAT_TEMPLATES = ("internlm2-chat", "tokenizer")
PROJECTORS = ("ln-mlp", "mlp")          # LayerNorm-Linear-GELU-Linear (keys 0,1,3) | Linear-GELU-Linear (keys 0,2)
PORTRAIT_INPUTS = ("vit", "projected")  # own projector on pixel-shuffled ViT features | InternVL's projector, then an MLP
SCORE_HEADS = ("relu-mlp5", "gelu-mlp2")
FRAME_SAMPLINGS = ("internvl", "centres")
TEMPORAL_PREPROCESSING = ("finevq", "kinetics")
FACE_EMBEDDINGS = ("l2", "raw")         # features/face.py
LEVEL_BINS = ("min-max", "fixed")


FIELD_KINDS = {"system_message": "text or null", "score_prompt": "text or null", "release_temporal": "text or null",
               "bos": "true/false", "wrap_slots": "true/false", "num_frames": "integer", "lora_scaling": "number",
               "projectors": "{text: text}", "release_names": "{text: text}", "release_unused": "[text]",
               "mos_range": "[min, max] or null"}  # every other field is text


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class RecipeError(InputError):
    """A recipe that is incomplete, inconsistent or names an unknown convention."""


@dataclass(frozen=True)
class Recipe:
    name: str
    # ----- the prompt (prompt.py renders it) -----
    chat_template: str            # CHAT_TEMPLATES: InternVL's internlm2-chat rendered exactly, or the tokenizer's own
    system_message: str | None    # the system turn; None: none
    bos: bool                     # the sequence starts with the tokenizer's BOS token
    frame_text: str               # once per sampled frame, {i} = 1..T; <slot> = the frame's image tokens
    portrait_text: str            # once per portrait frame, the same way
    face_text: str                # once; <slot> = one token per sampled frame
    motion_text: str              # once; <slot> = one token
    question: str                 # after the stream lines, with no separator added
    wrap_slots: bool              # each <slot> wrapped in the tokenizer's <img> ... </img>
    answer: str                   # the answer turn, teacher-forced up to {level}; the level word is read there
    score_prompt: str | None      # the score is read after "<answer> <score_prompt>" (level word filled in);
    #                               None: at the token before the level word (FineVQ's index -4)
    # ----- the modules (model.py builds them) -----
    projectors: dict              # stream -> PROJECTORS, for every stream the LM does not read directly
    portrait_input: str           # PORTRAIT_INPUTS
    score_head: str               # SCORE_HEADS; output x 100 is the 0-100 score
    # ----- the features (features/pipeline.py follows them) -----
    num_frames: int
    frame_sampling: str           # FRAME_SAMPLINGS: InternVL's int(seg/2 + round(seg*i)), seg=(n-1)/T; or segment centres
    temporal: str                 # TEMPORAL_PREPROCESSING (see features/temporal.py)
    level_bins: str               # LEVEL_BINS: equal-width bins between mos_range, or 0-20-40-60-80-100
    # ----- a release's own names (convert.py reads them) -----
    release_names: dict           # {release key prefix: our prefix} for projectors and the score head
    release_temporal: str | None  # prefix of SlowFast-R50's blocks 0-4 in the release, exported as temporal weights
    release_unused: tuple         # prefixes of tensors the release's own code never uses: dropped, and reported
    lora_scaling: float           # alpha / r of LoRA saved un-merged in a release
    mos_range: tuple | None = None  # (min, max) MOS of the training set, for min-max bins; set by training
    # FACE_EMBEDDINGS: what the face projector reads. Recipes written before this field were all "l2".
    face_embedding: str = "l2"

    def __post_init__(self):
        problems = self._type_problems()
        if problems:  # the checks below assume the types
            raise RecipeError(f"recipe {self.name!r}: " + "; ".join(problems))
        for name, allowed in (("chat_template", CHAT_TEMPLATES), ("portrait_input", PORTRAIT_INPUTS),
                              ("score_head", SCORE_HEADS), ("frame_sampling", FRAME_SAMPLINGS),
                              ("temporal", TEMPORAL_PREPROCESSING), ("level_bins", LEVEL_BINS),
                              ("face_embedding", FACE_EMBEDDINGS)):
            if getattr(self, name) not in allowed:
                problems.append(f"{name} is {getattr(self, name)!r}, expected one of {', '.join(allowed)}")
        for stream, kind in self.projectors.items():
            if stream not in STREAMS[1:] or kind not in PROJECTORS:
                problems.append(f"projectors[{stream!r}] = {kind!r}: streams are {', '.join(STREAMS[1:])}, "
                                f"structures {', '.join(PROJECTORS)}")
        for name in ("frame_text", "portrait_text", "face_text", "motion_text"):
            if getattr(self, name).count(SLOT) != 1:
                problems.append(f"{name} must hold {SLOT} exactly once: {getattr(self, name)!r}")
        placeholders = [name for _, name, _, _ in string.Formatter().parse(self.answer) if name is not None]
        if placeholders != ["level"] or not self.answer.split("{level}")[0].endswith(" "):
            problems.append(f"answer must hold ' {{level}}' (after a space) and no other placeholder: {self.answer!r}")
        object.__setattr__(self, "release_unused", tuple(self.release_unused))
        if self.num_frames < 1:
            problems.append(f"num_frames must be positive, got {self.num_frames}")
        if self.mos_range is not None:
            low, high = self.mos_range
            if not low < high:
                problems.append(f"mos_range must be (min, max) with min < max, got {self.mos_range}")
            object.__setattr__(self, "mos_range", (float(low), float(high)))
        if problems:
            raise RecipeError(f"recipe {self.name!r}: " + "; ".join(problems))

    def _type_problems(self) -> list[str]:
        """JSON recipe files are written by hand: "false" is not a bool, nor 8.0 a frame count."""
        checks = {
            "text": lambda v: isinstance(v, str),
            "text or null": lambda v: v is None or isinstance(v, str),
            "true/false": lambda v: isinstance(v, bool),
            "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "number": _is_number,
            "{text: text}": lambda v: isinstance(v, dict) and all(isinstance(x, str) for kv in v.items() for x in kv),
            "[text]": lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v),
            "[min, max] or null": lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) == 2
                                                          and all(map(_is_number, v))),
        }
        return [f"{f.name} must be {FIELD_KINDS.get(f.name, 'text')}, got {getattr(self, f.name)!r}"
                for f in dataclasses.fields(self) if not checks[FIELD_KINDS.get(f.name, "text")](getattr(self, f.name))]

    @property
    def streams(self) -> tuple:
        """Spatial frames and every stream the recipe states a projector for, in STREAMS order."""
        return tuple(s for s in STREAMS if s == "spatial" or s in self.projectors)

    @property
    def answer_prefix(self) -> str:
        """The teacher-forced answer up to the level word."""
        return self.answer.split("{level}")[0].rstrip()

    def level_bounds(self) -> tuple[float, float] | None:
        """The MOS range the five levels split equally; None where min-max bins lack the training range."""
        if self.level_bins == "fixed":
            return (0.0, 100.0)
        return self.mos_range

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, origin: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise RecipeError(f"{origin}: a recipe is a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        optional = {f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        unknown, missing = sorted(set(data) - names), sorted(names - set(data) - optional)
        if unknown or missing:
            raise RecipeError(f"{origin}: unknown recipe fields {unknown}, missing fields {missing}"
                              if unknown and missing else
                              f"{origin}: unknown recipe fields {unknown} (known: {sorted(names)})" if unknown else
                              f"{origin}: missing recipe fields {missing}")
        values = dict(data)
        if values.get("mos_range") is not None:
            values["mos_range"] = tuple(values["mos_range"])
        try:
            return cls(**values)
        except TypeError as error:
            raise RecipeError(f"{origin}: {error}") from error

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def derive(self, **changes) -> "Recipe":
        """This recipe with `changes`, named after what changed (e.g. "fvq[num_frames=4]"), so a
        checkpoint never claims a shipped recipe's name for other conventions."""
        changed = {k: v for k, v in changes.items() if getattr(self, k) != v}
        if not changed:
            return self
        name = f"{self.name}[{','.join(f'{k}={v}' for k, v in changed.items())}]"
        return dataclasses.replace(self, name=name, **changed)


FINEVQ = Recipe(
    name="finevq",
    chat_template="internlm2-chat", system_message=INTERNVL_SYSTEM_MESSAGE, bos=True,
    # FineVQ's inference.py: the frame lines joined by "\n", then "\nMotion Feature: <image>", then the question.
    frame_text="Frame{i}: <slot>\n", portrait_text="Portrait{i}: <slot>\n", face_text="Face: <slot>\n",
    motion_text="Motion Feature: <slot>",
    question="How would you rate the overall quality of this video?", wrap_slots=True,
    answer="The overall quality of the video is {level}.", score_prompt=None,
    projectors={"temporal": "ln-mlp"}, portrait_input="vit", score_head="relu-mlp5",
    num_frames=8, frame_sampling="internvl", temporal="finevq", level_bins="min-max",
    release_names={"motion_mlp.": "projectors.temporal.", "mlpscore.": "score_head."},
    release_temporal="slowfast_model.feature_extraction.",
    release_unused=("mlpscore.ln1.",),  # defined in FineVQ's stage-2 MLP, commented out of its forward
    lora_scaling=2.0)                   # FineVQ: lora_alpha = 2 * r

FVQ = FINEVQ.replace(
    name="fvq",
    answer="The video quality is {level}.", score_prompt="The score is",
    projectors={"portrait": "ln-mlp", "face": "ln-mlp", "temporal": "ln-mlp"})

RECIPES = {recipe.name: recipe for recipe in (FVQ, FINEVQ)}


def load_recipe(name: str | None = None, path: str | Path | None = None) -> Recipe:
    """A shipped recipe by name, or one read from a JSON file (all fields stated)."""
    if path is not None:
        if name is not None:
            raise RecipeError("give a recipe name or a recipe file, not both")
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RecipeError(f"{path}: cannot read a JSON recipe ({error})") from error
        return Recipe.from_dict(data, origin=str(path))
    name = name or FVQ.name
    if name not in RECIPES:
        raise RecipeError(f"unknown recipe {name!r}; shipped recipes: {', '.join(RECIPES)} (or --recipe-file)")
    return RECIPES[name]
