"""FVQ-Rater checkpoints: where they come from, how they are written and loaded, and safely.

A checkpoint folder holds `fvq_rater.json` (format, backbone reference, the rater config with its
recipe and feature settings), `heads.safetensors` (projectors, "no face" token, score head),
optionally `adapter/` (LoRA, PEFT layout) and `backbone/` (the base InternVL, when it is not
referenced elsewhere), and any feature model files it carries (e.g. SlowFast weights).

Paths in the config are stored relative to the checkpoint when they lie inside it, so a moved
checkpoint loads; a relative path can never leave the checkpoint folder. Only safetensors are read.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .common import WEIGHTS_ENV, write_atomically
from .errors import InputError
from .model import CheckpointError, FVQRater, FVQRaterConfig, peft_quietly

CONFIG_FILE = "fvq_rater.json"
HEADS_FILE = "heads.safetensors"
ADAPTER_DIR = "adapter"
BACKBONE_DIR = "backbone"
FORMAT_VERSION = 2
PATH_FEATURES = ("face_models", "portrait_model", "temporal_weights")  # FeatureConfig fields naming files
DTYPES = ("auto", "float32", "bfloat16", "float16")
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
HOW_TO_GET = ("Make a checkpoint with `fvq-rater demo` (tiny, CPU) or `fvq-rater train`, or convert the released "
              "weights with `fvq-rater convert`.")


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


def checkpoint_problem(directory) -> str | None:
    """Why `directory` is not an FVQ-Rater checkpoint (naming the checkpoints below it), or None."""
    directory = Path(directory)
    if (directory / CONFIG_FILE).is_file():
        return None
    below = sorted(str(p.parent) for p in directory.glob(f"*/{CONFIG_FILE}")) if directory.is_dir() else []
    hint = f"The checkpoints below it are {', '.join(below)}: pass one of them." if below else HOW_TO_GET
    return f"{directory} is not an FVQ-Rater checkpoint ({CONFIG_FILE} not found). {hint}"


def read_config(directory) -> dict:
    """The checkpoint's config as saved, format checked."""
    path = Path(directory) / CONFIG_FILE
    problem = checkpoint_problem(directory)
    if problem:
        raise CheckpointError(problem)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a readable JSON config ({error})") from error
    if data.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {data.get('format')!r}; this fvq-plugin reads format "
                              f"{FORMAT_VERSION} (older checkpoints: train or convert again)")
    return data


def inside(directory, reference: str, what: str) -> Path:
    """`reference` from a checkpoint's config as a path: a relative one is taken below `directory` and may not
    climb out of it with "..". (A symlink inside the checkpoint, e.g. to a shared backbone, is the owner's choice.)"""
    path = Path(reference)
    if path.is_absolute():
        return path
    if ".." in path.parts:
        raise CheckpointError(f"{Path(directory) / CONFIG_FILE}: {what} {reference!r} points outside the checkpoint")
    return Path(directory) / path


def _relative_if_inside(path, directory) -> str:
    path, root = Path(path).resolve(), Path(directory).resolve()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def feature_settings(directory, features: dict) -> dict:
    """The checkpoint's recorded feature settings with its file paths resolved (see `inside`)."""
    return {k: (str(inside(directory, v, k)) if k in PATH_FEATURES and v else v) for k, v in features.items()}


# ----- writing ----------------------------------------------------------------------------------


def save_rater(model: FVQRater, directory, copy_backbone: bool | None = None) -> Path:
    """Write config, LoRA adapter, projectors and heads (safetensors).

    The frozen base backbone is written into the checkpoint when it was randomly initialised
    or `copy_backbone` is set; otherwise the checkpoint refers to `base_path`, so saving a
    fine-tuned 8B model does not copy 16 GB each time.
    """
    from safetensors.torch import save_file

    if model.lora_merged:
        raise CheckpointError("this rater's LoRA was merged into its backbone for scoring, so saving it would lose the "
                              "adapter; load it with merge_lora=False (or trainable=True) to save it")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    copies_base = model.base_path is None or copy_backbone
    if copies_base:
        _save_base(model, directory / BACKBONE_DIR)
    backbone_ref = _relative_if_inside(directory / BACKBONE_DIR if copies_base else model.base_path, directory)
    shutil.rmtree(directory / ADAPTER_DIR, ignore_errors=True)  # never leave an earlier save's adapter behind
    if model.has_lora:
        model.backbone.save_pretrained(directory / ADAPTER_DIR)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.heads_state_dict().items()}, directory / HEADS_FILE)
    config = model.config.to_dict()
    config["features"] = {k: (_relative_if_inside(v, directory) if k in PATH_FEATURES and v else v)
                          for k, v in config["features"].items()}
    # The config last and whole: a folder whose config reads is a complete checkpoint.
    write_atomically(directory / CONFIG_FILE, json.dumps({"format": FORMAT_VERSION, "backbone": backbone_ref,
                                                          **config}, indent=2, ensure_ascii=False))
    return directory


def _save_base(model: FVQRater, target: Path) -> None:
    if model.base_path is not None:
        if model.base_path.resolve() != target.resolve():
            shutil.copytree(model.base_path, target, dirs_exist_ok=True)
        return
    from transformers import InternVLForConditionalGeneration

    # peft injected LoRA layers in place; rebuild the plain base model from its weights so the
    # saved backbone loads with any InternVL code, ours or not. Built on the meta device and given the
    # weights: no copy in memory, and no draw from the RNG, so saving never changes how training goes on.
    state = {k.replace(".base_layer.", "."): v for k, v in model.vlm.state_dict().items() if "lora_" not in k}
    with torch.device("meta"):
        base = InternVLForConditionalGeneration(model.vlm.config)
    base.load_state_dict(state, strict=True, assign=True)
    base.save_pretrained(target)
    model.tokenizer.save_pretrained(target)


# ----- loading ----------------------------------------------------------------------------------


def load_rater(directory, trainable: bool = False, merge_lora: bool | None = None, **load_options) -> FVQRater:
    """Load a checkpoint written by save_rater (or `fvq-rater convert`).

    load_options go to the backbone's from_pretrained: dtype, device_map, attn_implementation.
    A backbone dispatched by device_map stays where it was placed; the heads and projectors follow
    its input embeddings. LoRA is merged into the base weights for inference unless merge_lora=False
    (it never is for training).
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    data = read_config(directory)
    base_path = inside(directory, data.pop("backbone"), "backbone")
    data.pop("format")
    config = FVQRaterConfig.from_dict(data)
    config.features = feature_settings(directory, config.features)
    for folder in (base_path, directory / ADAPTER_DIR):
        _require_safetensors(folder)
    vlm, tokenizer = load_backbone(base_path, **load_options)
    backbone = vlm
    if (directory / ADAPTER_DIR).is_dir():
        from peft import PeftModel

        with peft_quietly():
            backbone = PeftModel.from_pretrained(vlm, directory / ADAPTER_DIR, is_trainable=trainable)
    model = FVQRater(config, backbone, tokenizer, base_path=base_path)
    heads = load_file(directory / HEADS_FILE)
    problems = model.load_state_dict(heads, strict=False)
    missing = [k for k in problems.missing_keys if not k.startswith("backbone.")]
    if missing or problems.unexpected_keys:
        raise CheckpointError(f"{directory / HEADS_FILE} does not match the config: missing {missing}, "
                              f"unexpected {problems.unexpected_keys}")
    model.trained_digest = trained_digest(model)
    if merge_lora is None:
        merge_lora = not trainable
    if merge_lora and not trainable:
        model.merge_lora()
    device = vlm.get_input_embeddings().weight.device
    for name, child in model.named_children():
        if name != "backbone":
            child.to(device)
    if "face" in config.streams:
        model.no_face.data = model.no_face.data.to(device)
    return model.train(trainable)


def base_identity(base_path) -> list | None:
    """What identifies a base backbone wherever it lies: its config and its weight files' names and sizes
    (hashing 16 GB of weights for every scoring run would cost minutes)."""
    if base_path is None:
        return None
    base_path = Path(base_path)
    files = sorted((p.relative_to(base_path).as_posix(), p.stat().st_size) for p in base_path.rglob("*.safetensors"))
    config = base_path / "config.json"
    return [config.read_text(encoding="utf-8") if config.is_file() else None, files]


def trained_digest(model: FVQRater) -> str:
    """A digest of everything training changed (heads, projectors, LoRA), taken before any LoRA merge."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.trained_state_dict().items()):
        digest.update(name.encode() + tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


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
