"""FVQ-Rater: an InternVL LMM reading four face-aware streams, with a level word and a score.

One prefill per batch: the prompt (prompt.py, laid out by the checkpoint's recipe) holds a slot for
every stream, whose embeddings are replaced by projected features, and ends with the answer
teacher-forced up to the level word. There the LM's logits over the five level words give the
level (as in Q-Align). The regression head reads the hidden state at that position too, or, where
the recipe has a score prompt ("The score is"), after "<level>. The score is": at inference the
level word is the LM's own choice and the few continuation tokens reuse the prompt's KV cache.

Streams and their tokens per video (T sampled frames, N vision tokens per frame):
  spatial   T*N  frames -> InternVL vision tower -> InternVL projector
  portrait  T*N  person-matted frames -> same vision tower -> its own projector (recipe: on the
                 pixel-shuffled ViT features, or after InternVL's projector)
  face      T    identity embeddings -> projector (a learned "no face" token where no face was found)
  temporal  1    SlowFast clip feature -> projector
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from .common import LEVELS, STREAMS
from .errors import InputError
from .prompt import Prompt
from .quiet import quiet_noisy_loggers
from .recipe import FVQ, Recipe

quiet_noisy_loggers()  # before transformers or peft import bitsandbytes

# peft matches these with re.fullmatch on module names of InternVLForConditionalGeneration.
VISION_LORA_MODULES = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.projection_layer",
                       "mlp.fc1", "mlp.fc2")
LLM_LORA_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
RELU_MLP5_WIDTHS = (1024, 256, 64, 16, 1)  # FineVQ's mlpscore after the LM width


class CheckpointError(InputError):
    """A directory that is not a loadable FVQ-Rater checkpoint."""


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    vision: bool = True
    llm: bool = True

    def target_modules(self) -> str:
        import re

        alternatives = []
        if self.vision:
            alternatives.append(r"vision_tower\.encoder\.layer\.\d+\.(%s)" % "|".join(map(re.escape, VISION_LORA_MODULES)))
        if self.llm:
            alternatives.append(r"language_model\.layers\.\d+\.(%s)" % "|".join(map(re.escape, LLM_LORA_MODULES)))
        return r".*\.(%s)" % "|".join(alternatives)


@dataclass
class FVQRaterConfig:
    streams: tuple | None = None  # None: the recipe's (spatial and every stream it states a projector for)
    face_dim: int = 512
    temporal_dim: int = 2304
    recipe: Recipe = FVQ
    lora: LoraSettings = field(default_factory=LoraSettings)
    # How the feature extractors were configured when this model was trained (paths relative to the checkpoint).
    features: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.recipe, dict):
            self.recipe = Recipe.from_dict(self.recipe)
        if self.streams is None:
            self.streams = self.recipe.streams
        unknown = set(self.streams) - set(STREAMS)
        if unknown or not self.streams:
            raise ValueError(f"streams must be a non-empty subset of {STREAMS}, got {self.streams}")
        self.streams = tuple(s for s in STREAMS if s in self.streams)
        if isinstance(self.lora, dict):
            known = {f.name for f in fields(LoraSettings)}
            if set(self.lora) - known:
                raise CheckpointError(f"unknown LoRA settings {sorted(set(self.lora) - known)} (known: {sorted(known)})")
            self.lora = LoraSettings(**self.lora)
        projected = [s for s in self.streams if s != "spatial"]
        missing = [s for s in projected if s not in self.recipe.projectors]
        if missing:
            raise InputError(f"recipe {self.recipe.name!r} states no projector structure for the streams {missing}")

    @property
    def num_frames(self) -> int:
        return self.recipe.num_frames

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FVQRaterConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise CheckpointError(f"unknown FVQ-Rater config fields: {sorted(unknown)}")
        return cls(**{k: (tuple(v) if k == "streams" else v) for k, v in data.items()})


@dataclass
class FVQRaterOutput:
    logits: torch.Tensor        # [B, vocab] next-token logits where the level word comes
    level_logits: torch.Tensor  # [B, 5] the same logits at the five level words
    score: torch.Tensor         # [B] regression head, MOS scale (unclamped while training)


def level_index(mos: torch.Tensor, bounds: tuple[float, float] = (0.0, 100.0)) -> torch.Tensor:
    """Five equal-width MOS bins between `bounds` -> 0..4 (bad..excellent)."""
    low, high = bounds
    return torch.clamp(((mos - low) * len(LEVELS) / (high - low)).floor().long(), 0, len(LEVELS) - 1)


def answer_text(level: str, score: float, recipe: Recipe = FVQ) -> str:
    return f"{recipe.answer.format(level=level)} {recipe.score_prompt or 'The score is'} {score:.2f}."


def vision_tokens_per_image(vlm_config) -> int:
    vision = vlm_config.vision_config
    height, width = _pair(vision.image_size)
    patch_h, patch_w = _pair(vision.patch_size)
    return round((height // patch_h) * (width // patch_w) * vlm_config.downsample_ratio ** 2)


@contextmanager
def peft_quietly():
    """peft 0.21 asks transformers 5 for `is_gradient_checkpointing`, which warns that it is deprecated."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _cache_keyword(language_model) -> str:
    """transformers 5.24 renamed the KV-cache argument `past_key_values` to `cache` (the old name warns)."""
    import inspect

    return "cache" if "cache" in inspect.signature(language_model.forward).parameters else "past_key_values"


def _pair(value):
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def projector(kind: str, inputs: int, width: int) -> nn.Sequential:
    """recipe.PROJECTORS: "ln-mlp" is InternVL's mlp1 / FineVQ's motion_mlp (keys 0,1,3), "mlp" has keys 0,2."""
    layers = [nn.Linear(inputs, width), nn.GELU(), nn.Linear(width, width)]
    return nn.Sequential(nn.LayerNorm(inputs), *layers) if kind == "ln-mlp" else nn.Sequential(*layers)


class ReluMLP5(nn.Module):
    """FineVQ's score head `mlpscore`: fc1..fc5 (width-1024-256-64-16-1), ReLU after every layer."""

    def __init__(self, width: int):
        super().__init__()
        sizes = (width, *RELU_MLP5_WIDTHS)
        for i in range(len(RELU_MLP5_WIDTHS)):
            setattr(self, f"fc{i + 1}", nn.Linear(sizes[i], sizes[i + 1]))

    @property
    def output(self) -> nn.Linear:
        return self.fc5

    def forward(self, hidden):
        for i in range(len(RELU_MLP5_WIDTHS)):
            hidden = torch.relu(getattr(self, f"fc{i + 1}")(hidden))
        return hidden


class GeluMLP2(nn.Sequential):
    """Linear-GELU-Linear(1) (keys 0, 2)."""

    def __init__(self, width: int):
        super().__init__(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))

    @property
    def output(self) -> nn.Linear:
        return self[2]


SCORE_HEAD_CLASSES = {"relu-mlp5": ReluMLP5, "gelu-mlp2": GeluMLP2}  # recipe.SCORE_HEADS


class FVQRater(nn.Module):
    def __init__(self, config: FVQRaterConfig, backbone, tokenizer, base_path=None):
        """`backbone`: an InternVLForConditionalGeneration, optionally wrapped by peft (LoRA).

        `base_path` is the directory the backbone's base weights came from (None: random init).
        The base stays frozen; LoRA, projectors and heads train.
        """
        from pathlib import Path

        super().__init__()
        self.config, self.backbone, self.tokenizer = config, backbone, tokenizer
        self.base_path = Path(base_path) if base_path else None
        self.trained_digest = None  # set by checkpoint loading: what the trained weights were before any merge
        self.lora_merged = False
        if not self.has_lora:
            self.backbone.requires_grad_(False)
        recipe = config.recipe
        width = self.vlm.config.text_config.hidden_size
        vit_width = self.vlm.config.vision_config.hidden_size * round(1 / self.vlm.config.downsample_ratio ** 2)
        inputs = {"portrait": vit_width if recipe.portrait_input == "vit" else width, "face": config.face_dim,
                  "temporal": config.temporal_dim}
        self.projectors = nn.ModuleDict({s: projector(recipe.projectors[s], inputs[s], width)
                                         for s in config.streams if s != "spatial"})
        if "face" in config.streams:
            self.no_face = nn.Parameter(torch.zeros(width))
        self.score_head = SCORE_HEAD_CLASSES[recipe.score_head](width)
        # An untrained head answers mid-scale (50) rather than an arbitrary value far outside 0-100.
        nn.init.zeros_(self.score_head.output.weight)
        nn.init.constant_(self.score_head.output.bias, 0.5)
        self.prompt = Prompt(recipe, tokenizer, config.streams, self.tokens_per_frame, self.vlm.config.image_token_id)
        self.register_buffer("prompt_ids", self.prompt.ids, persistent=False)
        self.register_buffer("stream_map", self.prompt.stream_map, persistent=False)
        self.register_buffer("level_ids", self.prompt.level_ids, persistent=False)
        if self.prompt.continuation_ids is not None:
            self.register_buffer("continuation_ids", self.prompt.continuation_ids, persistent=False)

    # ----- construction -------------------------------------------------------------------------

    @classmethod
    def create(cls, config: FVQRaterConfig, vlm, tokenizer, base_path=None) -> "FVQRater":
        """A new rater around `vlm` with fresh LoRA adapters (when config.lora.r > 0) and heads."""
        if config.lora.r > 0 and (config.lora.vision or config.lora.llm):
            from peft import LoraConfig, get_peft_model

            lora = config.lora
            with peft_quietly():
                vlm = get_peft_model(vlm, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                     target_modules=lora.target_modules()))
        return cls(config, vlm, tokenizer, base_path)

    @classmethod
    def random(cls, config: FVQRaterConfig, vlm_config, tokenizer, seed: int = 0, vision_tower=None) -> "FVQRater":
        """A randomly initialised backbone (tests, the demo, benchmarks of real-size shapes).

        `vision_tower`: a safetensors file of pretrained vision-tower weights to start from instead
        (the demo's, tower_pretraining.TOWER_FILE); the rest stays as `seed` draws it.
        """
        from transformers import InternVLForConditionalGeneration

        torch.manual_seed(seed)
        vlm = InternVLForConditionalGeneration(vlm_config)
        if vision_tower is not None:
            from .tower_pretraining import load_tower

            load_tower(vlm, vision_tower)
        return cls.create(config, vlm, tokenizer)

    @classmethod
    def from_backbone(cls, path, config: FVQRaterConfig | None = None, **load_options) -> "FVQRater":
        """Start from an InternVL checkpoint in transformers' native layout (e.g. InternVL3-8B-hf)."""
        from .checkpoint import load_backbone

        vlm, tokenizer = load_backbone(path, **load_options)
        return cls.create(config or FVQRaterConfig(), vlm, tokenizer, base_path=path)

    @classmethod
    def from_pretrained(cls, directory, trainable: bool = False, merge_lora: bool | None = None,
                        **load_options) -> "FVQRater":
        """Load a checkpoint (see checkpoint.load_rater); load_options: dtype, device_map, attn_implementation."""
        from .checkpoint import load_rater

        return load_rater(directory, trainable=trainable, merge_lora=merge_lora, **load_options)

    def save_pretrained(self, directory, copy_backbone: bool | None = None):
        """Write config, LoRA adapter, projectors and heads (see checkpoint.save_rater)."""
        from .checkpoint import save_rater

        return save_rater(self, directory, copy_backbone=copy_backbone)

    @property
    def has_lora(self) -> bool:
        return hasattr(self.backbone, "peft_config")

    @property
    def vlm(self):
        """The InternVLForConditionalGeneration (with LoRA layers injected, if any)."""
        return self.backbone.get_base_model() if self.has_lora else self.backbone

    @property
    def tokens_per_frame(self) -> int:
        return vision_tokens_per_image(self.vlm.config)

    @property
    def image_size(self) -> tuple[int, int]:
        return _pair(self.vlm.config.vision_config.image_size)

    def prompt_text(self) -> str:
        """The whole prompt as text (image-context tokens at the stream slots), up to the level word."""
        return self.prompt.text

    def merge_lora(self) -> None:
        """Fold LoRA into the base weights for inference: the same function, without the adapter's cost."""
        if self.has_lora:
            with peft_quietly():
                self.backbone = self.backbone.merge_and_unload()
            self.lora_merged = True

    def trained_state_dict(self) -> dict:
        """Everything training changes: heads, projectors and LoRA weights (the base backbone stays frozen)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.") or "lora_" in k}

    def heads_state_dict(self) -> dict:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    # ----- forward ------------------------------------------------------------------------------

    def forward(self, pixel_values=None, portrait_values=None, face_embeds=None, face_mask=None,
                temporal=None, levels=None) -> FVQRaterOutput:
        """Batch tensors: pixel_values/portrait_values [B,T,3,H,W], face_embeds [B,T,F], face_mask [B,T],
        temporal [B,Dt]. Only the configured streams are needed. `levels` [B] (0..4): the level words
        teacher-forced before the score prompt (training); None: the LM's own choice."""
        vlm = self.vlm
        tokens = self._stream_tokens(pixel_values, portrait_values, face_embeds, face_mask, temporal)
        batch = next(iter(tokens.values())).shape[0]
        embed = vlm.get_input_embeddings()
        embeds = embed(self.prompt_ids.to(embed.weight.device).expand(batch, -1))
        stream_map = self.stream_map.to(embeds.device)
        for stream, values in tokens.items():
            slots = stream_map == 1 + STREAMS.index(stream)
            if values.shape[0] != batch:
                raise ValueError(f"{stream}: {values.shape[0]} videos where {next(iter(tokens))} has {batch}")
            if values.shape[1] != int(slots.sum()):
                raise ValueError(f"{stream}: {values.shape[1]} tokens per video for {int(slots.sum())} prompt slots")
            positions = slots.expand(batch, -1).unsqueeze(-1)
            embeds = embeds.masked_scatter(positions, values.to(embeds.device, embeds.dtype))
        language_model = vlm.model.language_model
        # Every prompt has the same length, so there is no padding and the level word comes at -1.
        if self.prompt.continuation_ids is None:
            hidden = language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state[:, -1]
            level_logits = vlm.lm_head(hidden)
            score_hidden = hidden
        elif levels is not None:
            # Teacher-forced: prompt and "<level>. The score is" in one pass.
            continuation = self._continuation_embeds(levels, embeds.dtype)
            states = language_model(inputs_embeds=torch.cat([embeds, continuation], 1),
                                    use_cache=False).last_hidden_state
            level_logits = vlm.lm_head(states[:, embeds.shape[1] - 1])
            score_hidden = states[:, -1]
        else:
            from transformers import DynamicCache

            cache = {_cache_keyword(language_model): DynamicCache()}  # filled in place by the prefill
            prefill = language_model(inputs_embeds=embeds, use_cache=True, **cache)
            level_logits = vlm.lm_head(prefill.last_hidden_state[:, -1])
            chosen = level_logits[:, self.level_ids.to(level_logits.device)].argmax(-1)
            score_hidden = language_model(inputs_embeds=self._continuation_embeds(chosen, embeds.dtype),
                                          use_cache=True, **cache).last_hidden_state[:, -1]
        head = self.score_head.output.weight
        score = self.score_head(score_hidden.to(head.device, head.dtype)).squeeze(-1) * 100
        return FVQRaterOutput(level_logits, level_logits[:, self.level_ids.to(level_logits.device)], score)

    def _continuation_embeds(self, levels: torch.Tensor, dtype) -> torch.Tensor:
        """Embeddings of "<level>. The score is" for each video's level index."""
        embed = self.vlm.get_input_embeddings()
        device = embed.weight.device
        return embed(self.continuation_ids.to(device)[levels.to(device)]).to(dtype)

    def _stream_tokens(self, pixel_values, portrait_values, face_embeds, face_mask, temporal) -> dict:
        """Each configured stream's token embeddings, [B, tokens, width], in prompt order."""
        given = {"spatial": pixel_values, "portrait": portrait_values, "face": face_embeds, "temporal": temporal}
        missing = [s for s in self.config.streams if given[s] is None]
        if missing or ("face" in self.config.streams and face_mask is None):
            raise ValueError(f"this FVQ-Rater needs the streams {self.config.streams}; missing: {missing or ['face_mask']}")
        tokens = {}
        image_streams = [s for s in ("spatial", "portrait") if s in self.config.streams]
        if image_streams:
            # One vision-tower pass over spatial and portrait frames together.
            batch, count = given[image_streams[0]].shape[:2]
            images = torch.cat([given[s].flatten(0, 1) for s in image_streams]).to(self.vision_dtype)
            projected, shuffled = self._image_features(images)
            for stream, part, vit in zip(image_streams, projected.split(batch * count), shuffled.split(batch * count)):
                if stream == "portrait":
                    part = self._project(stream, vit if self.config.recipe.portrait_input == "vit" else part)
                tokens[stream] = part.reshape(batch, -1, part.shape[-1])
        if "face" in self.config.streams:
            if tuple(face_mask.shape) != tuple(face_embeds.shape[:2]):
                raise ValueError(f"face_mask {tuple(face_mask.shape)} does not match face_embeds {tuple(face_embeds.shape)}")
            projected = self._project("face", face_embeds)
            tokens["face"] = torch.where(face_mask.to(projected.device).bool().unsqueeze(-1), projected,
                                         self.no_face.to(projected.dtype))
        if "temporal" in self.config.streams:
            tokens["temporal"] = self._project("temporal", temporal).unsqueeze(1)
        return {s: tokens[s] for s in self.config.streams}

    def _image_features(self, images):
        """InternVL's projected image tokens and the pixel-shuffled ViT features its projector took."""
        seen = []
        hook = self.vlm.model.multi_modal_projector.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
        try:
            projected = self.vlm.model.get_image_features(pixel_values=images).pooler_output
        finally:
            hook.remove()
        return projected, seen[0]

    def _project(self, stream, values):
        first = next(self.projectors[stream].parameters())
        return self.projectors[stream](values.to(first.device, first.dtype))

    @property
    def vision_dtype(self):
        return next(self.vlm.model.vision_tower.parameters()).dtype

    @torch.no_grad()
    def predict(self, **batch) -> list[dict]:
        """Score, level, the level head's probabilities and the answer text.

        The level word names the score's bin (the recipe's bins), so the answer never contradicts
        itself; where the bins are unknown (min-max bins of a release without its MOS range) it is
        the LM's most probable level word.
        """
        output = self(**batch)
        probabilities = output.level_logits.float().softmax(-1)
        scores = output.score.float().clamp(0, 100)
        recipe = self.config.recipe
        bounds = recipe.level_bounds()
        if bounds is not None:
            levels = level_index(torch.round(scores * 100) / 100, bounds)  # the bin of the score as the text shows it
        else:
            levels = probabilities.argmax(-1)
        return [{"score": score, "level": LEVELS[level], "level_probs": dict(zip(LEVELS, probs)),
                 "text": answer_text(LEVELS[level], score, recipe)}
                for score, level, probs in zip(scores.tolist(), levels.tolist(), probabilities.tolist())]
