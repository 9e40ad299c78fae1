"""FVQ-Rater: an InternVL LMM reading four face-aware streams, with a level word and a score.

One forward per batch (prefill only): the prompt holds placeholder positions for every stream,
their embeddings are replaced by projected features, and the answer prefix "The video quality is"
is teacher-forced. At its last position the LM's logits over the five level words give the level
(as in Q-Align) and a regression head on the hidden state gives the 0-100 score.

Streams and their tokens per video (T sampled frames, N vision tokens per frame):
  spatial   T*N  frames -> InternVL vision tower -> InternVL projector
  portrait  T*N  person-matted frames -> same vision tower and projector -> our MLP
  face      T    identity embeddings -> our MLP (a learned "no face" token where no face was found)
  temporal  1    SlowFast clip feature -> our MLP
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from .errors import InputError
from .quiet import quiet_noisy_loggers

quiet_noisy_loggers()  # before transformers or peft import bitsandbytes

STREAMS = ("spatial", "portrait", "face", "temporal")
LEVELS = ("bad", "poor", "fair", "good", "excellent")
CONFIG_FILE = "fvq_rater.json"
HEADS_FILE = "heads.safetensors"
ADAPTER_DIR = "adapter"
BACKBONE_DIR = "backbone"
FORMAT_VERSION = 1

_MARKER = re.compile(r"<fvq_(spatial|portrait|face|temporal)>")
# peft matches these with re.fullmatch on module names of InternVLForConditionalGeneration.
VISION_LORA_MODULES = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.projection_layer",
                       "mlp.fc1", "mlp.fc2")
LLM_LORA_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


WEIGHTS_ENV = "FVQ_RATER_WEIGHTS"


class CheckpointError(InputError):
    """A directory that is not a loadable FVQ-Rater checkpoint."""


DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_dtype(name):
    """A dtype given by name, as on the command line and in lmms-eval's model_args; None for auto."""
    if name is None or isinstance(name, torch.dtype) or name == "auto":
        return None if name == "auto" else name
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def checkpoint_path(given, option: str) -> str:
    """The checkpoint folder given through `option` (as the user types it), else from FVQ_RATER_WEIGHTS.

    Checked before anything heavy loads; the error says where the path came from.
    """
    path = given or os.environ.get(WEIGHTS_ENV)
    if not path:
        raise CheckpointError(f"no FVQ-Rater weights: pass {option} or set {WEIGHTS_ENV}=DIR. {HOW_TO_GET}")
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(problem if given else f"{WEIGHTS_ENV} (from the environment): {problem}")
    return str(path)


HOW_TO_GET = ("Make a checkpoint with `fvq-rater demo` (tiny, CPU) or `fvq-rater train`, or convert the released "
              "weights with `fvq-rater convert`.")


def checkpoint_problem(directory) -> str | None:
    """Why `directory` is not an FVQ-Rater checkpoint (naming the checkpoints below it), or None."""
    directory = Path(directory)
    if (directory / CONFIG_FILE).is_file():
        return None
    below = sorted(str(p.parent) for p in directory.glob(f"*/{CONFIG_FILE}")) if directory.is_dir() else []
    hint = f"The checkpoints below it are {', '.join(below)}: pass one of them." if below else HOW_TO_GET
    return f"{directory} is not an FVQ-Rater checkpoint ({CONFIG_FILE} not found). {hint}"


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    vision: bool = True
    llm: bool = True

    def target_modules(self) -> str:
        alternatives = []
        if self.vision:
            alternatives.append(r"vision_tower\.encoder\.layer\.\d+\.(%s)" % "|".join(map(re.escape, VISION_LORA_MODULES)))
        if self.llm:
            alternatives.append(r"language_model\.layers\.\d+\.(%s)" % "|".join(map(re.escape, LLM_LORA_MODULES)))
        return r".*\.(%s)" % "|".join(alternatives)


@dataclass
class FVQRaterConfig:
    streams: tuple = STREAMS
    num_frames: int = 8
    face_dim: int = 512
    temporal_dim: int = 2304
    prompt: str = "Please evaluate the quality of this video."
    answer_prefix: str = "The video quality is"
    lora: LoraSettings = field(default_factory=LoraSettings)
    # How the feature extractors were configured when this model was trained (recorded, not used here).
    features: dict = field(default_factory=dict)

    def __post_init__(self):
        unknown = set(self.streams) - set(STREAMS)
        if unknown or not self.streams:
            raise ValueError(f"streams must be a non-empty subset of {STREAMS}, got {self.streams}")
        self.streams = tuple(s for s in STREAMS if s in self.streams)
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FVQRaterConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - {"backbone", "format"}
        if unknown:
            raise CheckpointError(f"unknown FVQ-Rater config fields: {sorted(unknown)}")
        return cls(**{k: (tuple(v) if k == "streams" else v) for k, v in data.items() if k in known})


@dataclass
class FVQRaterOutput:
    logits: torch.Tensor        # [B, vocab] next-token logits after the answer prefix
    level_logits: torch.Tensor  # [B, 5] the same logits at the five level words
    score: torch.Tensor         # [B] regression head, MOS scale (unclamped while training)


def level_index(mos: torch.Tensor) -> torch.Tensor:
    """Equal-width MOS bins 0-20-40-60-80-100 -> 0..4 (bad..excellent)."""
    return torch.clamp((mos / 20).long(), 0, len(LEVELS) - 1)


def answer_text(level: str, score: float, prefix: str = "The video quality is") -> str:
    return f"{prefix} {level}. The score is {score:.2f}."


def vision_tokens_per_image(vlm_config) -> int:
    vision = vlm_config.vision_config
    height, width = _pair(vision.image_size)
    patch_h, patch_w = _pair(vision.patch_size)
    return round((height // patch_h) * (width // patch_w) * vlm_config.downsample_ratio ** 2)


@contextmanager
def _peft_quietly():
    """peft 0.21 asks transformers 5 for `is_gradient_checkpointing`, which warns that it is deprecated."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _pair(value):
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def _mlp(inputs: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, width), nn.GELU(), nn.Linear(width, width))


class FVQRater(nn.Module):
    def __init__(self, config: FVQRaterConfig, backbone, tokenizer, base_path: str | Path | None = None):
        """`backbone`: an InternVLForConditionalGeneration, optionally wrapped by peft (LoRA).

        `base_path` is the directory the backbone's base weights came from (None: random init).
        The base stays frozen; LoRA, projectors and heads train.
        """
        super().__init__()
        self.config, self.backbone, self.tokenizer = config, backbone, tokenizer
        self.base_path = Path(base_path) if base_path else None
        if not self.has_lora:
            self.backbone.requires_grad_(False)
        width = self.vlm.config.text_config.hidden_size
        inputs = {"portrait": width, "face": config.face_dim, "temporal": config.temporal_dim}
        self.projectors = nn.ModuleDict({s: _mlp(inputs[s], width) for s in config.streams if s != "spatial"})
        if "face" in config.streams:
            self.no_face = nn.Parameter(torch.zeros(width))
        self.score_head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))
        # An untrained head answers mid-scale (50) rather than an arbitrary value far outside 0-100.
        nn.init.zeros_(self.score_head[2].weight)
        nn.init.constant_(self.score_head[2].bias, 0.5)
        prompt_ids, stream_map = self._build_prompt()
        self.register_buffer("prompt_ids", prompt_ids, persistent=False)
        self.register_buffer("stream_map", stream_map, persistent=False)
        self.register_buffer("level_ids", self._level_token_ids(), persistent=False)

    # ----- construction -------------------------------------------------------------------------

    @classmethod
    def create(cls, config: FVQRaterConfig, vlm, tokenizer, base_path=None) -> "FVQRater":
        """A new rater around `vlm` with fresh LoRA adapters (when config.lora.r > 0) and heads."""
        if config.lora.r > 0 and (config.lora.vision or config.lora.llm):
            from peft import LoraConfig, get_peft_model

            lora = config.lora
            with _peft_quietly():
                vlm = get_peft_model(vlm, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                     target_modules=lora.target_modules()))
        return cls(config, vlm, tokenizer, base_path)

    @classmethod
    def random(cls, config: FVQRaterConfig, vlm_config, tokenizer, seed: int = 0) -> "FVQRater":
        """A randomly initialised backbone (tests, the demo, benchmarks of real-size shapes)."""
        from transformers import InternVLForConditionalGeneration

        torch.manual_seed(seed)
        return cls.create(config, InternVLForConditionalGeneration(vlm_config), tokenizer)

    @classmethod
    def from_backbone(cls, path, config: FVQRaterConfig | None = None, **load_options) -> "FVQRater":
        """Start from an InternVL checkpoint in transformers' native layout (e.g. InternVL3-8B-hf)."""
        vlm, tokenizer = load_backbone(path, **load_options)
        return cls.create(config or FVQRaterConfig(), vlm, tokenizer, base_path=path)

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

    # ----- prompt -------------------------------------------------------------------------------

    def _user_text(self) -> str:
        streams, frames = self.config.streams, self.config.num_frames
        tokenizer = self.tokenizer
        start, end = getattr(tokenizer, "start_image_token", None) or "", getattr(tokenizer, "end_image_token", None) or ""
        lines = []
        if "spatial" in streams:
            lines += [f"Frame{i + 1}: {start}<fvq_spatial>{end}" for i in range(frames)]
        if "portrait" in streams:
            lines.append("Portrait: " + "".join(f"{start}<fvq_portrait>{end}" for _ in range(frames)))
        if "face" in streams:
            lines.append("Face: <fvq_face>")
        if "temporal" in streams:
            lines.append("Motion: <fvq_temporal>")
        return "\n".join(lines + [self.config.prompt])

    def prompt_text(self) -> str:
        """The whole prompt as text, stream markers included, ending in the answer prefix."""
        user = self._user_text()
        if getattr(self.tokenizer, "chat_template", None):
            rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                          add_generation_prompt=True)
        else:
            rendered = f"user: {user}\nassistant: "
        return rendered + self.config.answer_prefix

    def _build_prompt(self):
        """Token ids of the prompt and, per position, 0 for text or 1 + the stream's index."""
        counts = {"spatial": self.tokens_per_frame, "portrait": self.tokens_per_frame, "face": self.config.num_frames,
                  "temporal": 1}
        placeholder = self.vlm.config.image_token_id
        ids, streams = [], []
        for i, piece in enumerate(_MARKER.split(self.prompt_text())):
            if i % 2:
                ids += [placeholder] * counts[piece]
                streams += [1 + STREAMS.index(piece)] * counts[piece]
            elif piece:
                text_ids = self.tokenizer(piece, add_special_tokens=False).input_ids
                ids += text_ids
                streams += [0] * len(text_ids)
        return torch.tensor(ids), torch.tensor(streams)

    def _level_token_ids(self) -> torch.Tensor:
        """The first token of each level word where it follows the answer prefix."""
        prefix = self.tokenizer(self.config.answer_prefix, add_special_tokens=False).input_ids
        ids = []
        for level in LEVELS:
            full = self.tokenizer(f"{self.config.answer_prefix} {level}", add_special_tokens=False).input_ids
            if full[:len(prefix)] != prefix or len(full) == len(prefix):
                raise CheckpointError(f"the tokenizer does not continue {self.config.answer_prefix!r} with {level!r} "
                                      "cleanly")
            ids.append(full[len(prefix)])
        if len(set(ids)) != len(LEVELS):
            raise CheckpointError(f"level words share a first token in this tokenizer: {dict(zip(LEVELS, ids))}")
        return torch.tensor(ids)

    # ----- forward ------------------------------------------------------------------------------

    def forward(self, pixel_values=None, portrait_values=None, face_embeds=None, face_mask=None,
                temporal=None) -> FVQRaterOutput:
        """Batch tensors: pixel_values/portrait_values [B,T,3,H,W], face_embeds [B,T,F], face_mask [B,T],
        temporal [B,Dt]. Only the configured streams are needed."""
        vlm = self.vlm
        tokens = self._stream_tokens(pixel_values, portrait_values, face_embeds, face_mask, temporal)
        batch = next(iter(tokens.values())).shape[0]
        embed = vlm.get_input_embeddings()
        ids = self.prompt_ids.to(embed.weight.device).expand(batch, -1)
        embeds = embed(ids)
        stream_map = self.stream_map.to(embeds.device)
        for stream, values in tokens.items():
            positions = (stream_map == 1 + STREAMS.index(stream)).expand(batch, -1).unsqueeze(-1)
            embeds = embeds.masked_scatter(positions, values.to(embeds.device, embeds.dtype))
        # Every prompt has the same length, so there is no padding and the answer position is -1.
        hidden = vlm.model.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state[:, -1]
        logits = vlm.lm_head(hidden)
        head = self.score_head[0].weight
        score = self.score_head(hidden.to(head.device, head.dtype)).squeeze(-1) * 100
        return FVQRaterOutput(logits, logits[:, self.level_ids.to(logits.device)], score)

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
            vision = self.vlm.model.get_image_features(pixel_values=images).pooler_output
            for stream, part in zip(image_streams, vision.split(batch * count)):
                part = part.reshape(batch, -1, part.shape[-1])
                tokens[stream] = self._project(stream, part) if stream in self.projectors else part
        if "face" in self.config.streams:
            projected = self._project("face", face_embeds)
            tokens["face"] = torch.where(face_mask.to(projected.device).bool().unsqueeze(-1), projected,
                                         self.no_face.to(projected.dtype))
        if "temporal" in self.config.streams:
            tokens["temporal"] = self._project("temporal", temporal).unsqueeze(1)
        return {s: tokens[s] for s in self.config.streams}

    def _project(self, stream, values):
        weight = self.projectors[stream][0].weight
        return self.projectors[stream](values.to(weight.device, weight.dtype))

    @property
    def vision_dtype(self):
        return next(self.vlm.model.vision_tower.parameters()).dtype

    @torch.no_grad()
    def predict(self, **batch) -> list[dict]:
        """Score, level (the score's 20-point bin), the level head's probabilities and the answer text."""
        output = self(**batch)
        probabilities = output.level_logits.float().softmax(-1)
        scores = output.score.float().clamp(0, 100)
        results = []
        # The level word names the score's bin, so the answer never contradicts itself; the level
        # head's own distribution is reported beside it.
        levels = level_index(torch.round(scores * 100) / 100)  # the bin of the score as the text shows it
        for score, level, probs in zip(scores.tolist(), levels.tolist(), probabilities.tolist()):
            results.append({"score": score, "level": LEVELS[level], "level_probs": dict(zip(LEVELS, probs)),
                            "text": answer_text(LEVELS[level], score, self.config.answer_prefix)})
        return results

    # ----- checkpoints --------------------------------------------------------------------------

    def trained_state_dict(self) -> dict:
        """Everything training changes: heads, projectors and LoRA weights (the base backbone stays frozen)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.") or "lora_" in k}

    def heads_state_dict(self) -> dict:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def save_pretrained(self, directory, copy_backbone: bool | None = None) -> Path:
        """Write config, LoRA adapter, projectors and heads (safetensors).

        The frozen base backbone is written into the checkpoint when it was randomly initialised
        or `copy_backbone` is set; otherwise the checkpoint refers to `base_path`, so saving a
        fine-tuned 8B model does not copy 16 GB each time.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.base_path is None or copy_backbone:
            backbone_ref = BACKBONE_DIR
            self._save_base(directory / BACKBONE_DIR)
        else:
            backbone_ref = str(self.base_path.resolve())
        if self.has_lora:
            self.backbone.save_pretrained(directory / ADAPTER_DIR)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.heads_state_dict().items()}, directory / HEADS_FILE)
        config = {"format": FORMAT_VERSION, "backbone": backbone_ref, **self.config.to_dict()}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return directory

    def _save_base(self, target: Path):
        if self.base_path is not None:
            if self.base_path.resolve() != target.resolve():
                shutil.copytree(self.base_path, target, dirs_exist_ok=True)
            return
        from transformers import InternVLForConditionalGeneration

        # peft injected LoRA layers in place; rebuild the plain base model from its weights so the
        # saved backbone loads with any InternVL code, ours or not.
        state = {k.replace(".base_layer.", "."): v for k, v in self.vlm.state_dict().items() if "lora_" not in k}
        base = InternVLForConditionalGeneration(self.vlm.config)
        base.load_state_dict(state, strict=True)
        base.save_pretrained(target)
        self.tokenizer.save_pretrained(target)

    @classmethod
    def from_pretrained(cls, directory, trainable: bool = False, **load_options) -> "FVQRater":
        """Load a checkpoint written by save_pretrained (or `fvq-rater convert`).

        load_options go to the backbone's from_pretrained: dtype, device_map, attn_implementation.
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        problem = checkpoint_problem(directory)
        if problem:
            raise CheckpointError(problem)
        data = json.loads(config_path.read_text())
        if data.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{config_path}: unsupported checkpoint format {data.get('format')!r}")
        config = FVQRaterConfig.from_dict(data)
        base_path = directory / data["backbone"]  # an absolute reference stays absolute
        for folder in (base_path, directory / ADAPTER_DIR):
            _require_safetensors(folder)
        vlm, tokenizer = load_backbone(base_path, **load_options)
        backbone = vlm
        if (directory / ADAPTER_DIR).is_dir():
            from peft import PeftModel

            with _peft_quietly():
                backbone = PeftModel.from_pretrained(vlm, directory / ADAPTER_DIR, is_trainable=trainable)
        model = cls(config, backbone, tokenizer, base_path=base_path)
        heads = load_file(directory / HEADS_FILE)
        problems = model.load_state_dict(heads, strict=False)
        missing = [k for k in problems.missing_keys if not k.startswith("backbone.")]
        if missing or problems.unexpected_keys:
            raise CheckpointError(f"{directory / HEADS_FILE} does not match the config: missing {missing}, "
                                  f"unexpected {problems.unexpected_keys}")
        model.to(vlm.get_input_embeddings().weight.device)
        return model.train(trainable)


PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def _require_safetensors(folder: Path) -> None:
    """Loading never unpickles: a weights folder without safetensors files is refused."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED_WEIGHTS)
    if pickled:
        raise CheckpointError(f"{folder} holds pickle-based weights ({', '.join(pickled)}), which can run code when "
                              "loaded; FVQ-Rater loads safetensors only. Re-save them as safetensors "
                              "(save_pretrained(..., safe_serialization=True)) from a trusted environment.")


def load_backbone(path, dtype=None, device_map=None, attn_implementation=None):
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"no InternVL backbone at {path} (config.json not found)")
    options = {k: v for k, v in {"dtype": dtype, "device_map": device_map,
                                 "attn_implementation": attn_implementation}.items() if v is not None}
    vlm = InternVLForConditionalGeneration.from_pretrained(path, **options)
    return vlm, AutoTokenizer.from_pretrained(path)
