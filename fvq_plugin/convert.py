"""Convert released FVQ-Rater weights (original InternVL-chat layout) into our checkpoint format.

What is known about the release (HF `Human-X/FVQ-Rater`)
---------------------------------------------------------
FVQ-Rater is built on InternVL, whose original releases use OpenGVLab's custom code
(`"model_type": "internvl_chat"`). That layout is public and is converted here exactly:

  config.json   vision_config (InternViT), llm_config (InternLM2 / Qwen2 / Llama), downsample_ratio,
                force_image_size, select_layer, ps_version, template
  weights       model.safetensors, or shards listed in model.safetensors.index.json
  vision_model.*        InternViT; its fused `attn.qkv` is split into q/k/v ([q; k; v] rows)
  mlp1.{0,1,3}.*        the projector (LayerNorm, Linear, GELU, Linear)
  language_model.*      Qwen2/Llama names, or InternLM2 names with a grouped fused `wqkv`

The result is transformers' native InternVLForConditionalGeneration, checked against the key names
and shapes of the native model built from the converted config.

A release's own conventions come from a recipe (fvq_plugin/recipe.py): its prompt, projector and
score-head structures, read-out position, preprocessing, and its module names:
  release_names     {release prefix: ours}, e.g. FineVQ's motion_mlp. -> projectors.temporal.,
                    mlpscore. -> score_head. (fc1..fc5)
  release_temporal  the prefix of SlowFast-R50's blocks 0-4 (FineVQ: slowfast_model.feature_extraction.),
                    exported as temporal/slowfast_r50.safetensors inside the converted checkpoint
  release_unused    tensors the release's own code never uses (FineVQ's mlpscore.ln1.): dropped, reported
  lora_scaling      alpha / r for LoRA saved un-merged (PEFT's base_model.model. prefixes, .base_layer,
                    lora_A/lora_B): merged as W + scaling * B @ A on the fused qkv / wqkv before splitting
`--recipe finevq` loads FineVQ's layout exactly. FVQ-Rater's authors released no code, so the names
of its portrait and face projectors and "no face" token are unknown; the `fvq` recipe keeps FineVQ's
names where FineVQ had the module. Run the conversion once: the strict report lists every unused
source key with its shape next to every FVQ-Rater weight still missing with its expected shape, e.g.

    fvq-rater convert ./FVQ-Rater ./fvq-rater-converted
      source keys not used (6):
        face_mlp.0.weight  [4096, 512]
        ...
      FVQ-Rater weights missing from the source (6):
        projectors.face.0.weight  [512]
        ...

then name them by prefix (`--map face_mlp.=projectors.face.`), or write a recipe file stating the
release's names and structures (`--recipe-file fvq-rater.json`) and convert again.
(`huggingface-cli download Human-X/FVQ-Rater --local-dir ./FVQ-Rater` fetches the release; this
module reads local directories only.) A release whose heads differ in structure from the recipe's
reports shape mismatches instead of loading.

This conversion was tested on synthetic checkpoints written in the chat layout and in FineVQ's
exact layout from tiny random models, never against the real released weights.

Policy: by default any unused source key, missing weight or shape mismatch is an error (a
ConversionError carrying the report) and nothing is written. `allow_unmatched` writes anyway,
dropping unused keys and leaving missing projectors / "no face" token freshly initialised. The
backbone and the score head must always be complete: random weights there would make every score
meaningless. Every written checkpoint keeps its report in DST/conversion_report.txt.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoTokenizer, InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig,
                          LlamaConfig, PreTrainedTokenizerFast, Qwen2Config)

from .checkpoint import BACKBONE_DIR
from .errors import InputError
from .model import FVQRater, FVQRaterConfig, LoraSettings
from .recipe import Recipe

REPORT_FILE = "conversion_report.txt"
TEMPORAL_FILE = "temporal/slowfast_r50.safetensors"  # inside the converted checkpoint
# InternVL's image tokens under the names native InternVL tokenizers give them; our prompt uses them.
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}
BACKBONE_PREFIXES = ("vision_model.", "mlp1.", "language_model.")
LLM_KINDS = {"InternLM2ForCausalLM": "internlm2", "Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}

# (pattern, replacement) pairs applied in order; a key no rule fits keeps its name and is then
# reported as unused, since the native model has no such weight.
VISION_RENAMES = [
    (r"^vision_model\.", "model.vision_tower."),
    (r"\.encoder\.layers\.", ".encoder.layer."),
    (r"\.embeddings\.class_embedding$", ".embeddings.cls_token"),
    (r"\.embeddings\.position_embedding$", ".embeddings.position_embeddings"),
    (r"\.embeddings\.patch_embedding\.", ".embeddings.patch_embeddings.projection."),
    (r"\.ls([12])$", r".lambda_\1"),
    (r"\.attn\.proj\.", ".attention.projection_layer."),
    (r"\.attn\.", ".attention."),  # qkv, q_norm, k_norm
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
]
PROJECTOR_RENAMES = [
    (r"^mlp1\.0\.", "model.multi_modal_projector.layer_norm."),
    (r"^mlp1\.1\.", "model.multi_modal_projector.linear_1."),
    (r"^mlp1\.3\.", "model.multi_modal_projector.linear_2."),
]
LLM_RENAMES = [
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
]
INTERNLM2_RENAMES = [
    (r"^language_model\.model\.tok_embeddings\.", "model.language_model.embed_tokens."),
    (r"^language_model\.output\.", "lm_head."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"\.attention\.wo\.", ".self_attn.o_proj."),
    (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
    (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
    (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
    (r"\.attention_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
]


class ConversionError(InputError):
    """The source cannot be converted as asked; `report` (when there is one) says what did not match."""

    def __init__(self, message: str, report: ConversionReport | None = None):
        super().__init__(message if report is None else f"{message}\n\n{report}")
        self.report = report


@dataclass
class ConversionReport:
    source: str
    mapped: int = 0                                              # target tensors filled from the source
    unmatched_source: list = field(default_factory=list)         # source keys not used
    missing_target: list = field(default_factory=list)           # our weights the source did not provide
    shape_mismatches: list = field(default_factory=list)         # "source [shape] -> target expects [shape]"
    notes: list = field(default_factory=list)
    shapes: dict = field(default_factory=dict, repr=False)       # shape of each listed key, for the printout

    @property
    def clean(self) -> bool:
        return not (self.unmatched_source or self.missing_target or self.shape_mismatches)

    def __str__(self) -> str:
        lines = [f"Conversion of {self.source}", f"  tensors mapped: {self.mapped}"]
        for title, keys in (("source keys not used", self.unmatched_source),
                            ("FVQ-Rater weights missing from the source", self.missing_target),
                            ("shape mismatches", self.shape_mismatches)):
            if keys:
                lines.append(f"  {title} ({len(keys)}):")
                lines += [f"    {key}  {_shape(self.shapes[key])}" if key in self.shapes else f"    {key}"
                          for key in keys]
        if self.notes:
            lines.append("  notes:")
            lines += [f"    - {note}" for note in self.notes]
        if self.unmatched_source or self.missing_target:
            lines.append("  Map release names onto ours by prefix: --map SRC_PREFIX=OUR_PREFIX "
                         "(head_map={SRC_PREFIX: OUR_PREFIX}), e.g. --map face_mlp.=projectors.face.")
        lines.append("  result: " + ("clean" if self.clean else "NOT clean"))
        return "\n".join(lines)


def _shape(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


# ----- the conversion ---------------------------------------------------------------------------


def convert_checkpoint(src, dst, head_map: dict[str, str] | None = None, allow_unmatched: bool = False, *,
                       recipe: Recipe) -> ConversionReport:
    """Convert the InternVL-chat-layout checkpoint in directory `src` into an FVQ-Rater checkpoint `dst`.

    recipe: the release's conventions (prompt, module structures, read-out, preprocessing) and its
    own module names (recipe.release_names, release_temporal, release_unused, lora_scaling).
    head_map: further {source key prefix: our prefix} names, over the recipe's (longest prefix wins).
    """
    src, dst = Path(src), Path(dst)
    chat = _read_chat_config(src)
    template = chat.get("template")
    if recipe.chat_template == "internlm2-chat" and template not in (None, "internlm2-chat"):
        raise ConversionError(f"{src / 'config.json'} names the conversation template {template!r}, recipe "
                              f"{recipe.name!r} renders 'internlm2-chat': give a recipe whose chat template matches "
                              "the release (--recipe-file)")
    if dst.exists() and any(dst.iterdir()):
        raise ConversionError(f"{dst} exists and is not empty; convert into a new directory")
    tokenizer = load_tokenizer(src)
    vlm_config = native_config(chat, tokenizer)
    llm_kind = LLM_KINDS[chat["llm_config"]["architectures"][0]]
    report = ConversionReport(str(src), notes=_config_notes(chat, llm_kind, recipe))

    source = merge_peft_lora(read_weights(src), recipe.lora_scaling, report)
    dropped = sorted(key for key in source if key.startswith(recipe.release_unused))
    if dropped:
        report.notes.append(f"dropped, unused by the release's own code (recipe release_unused): {', '.join(dropped)}")
    source = {k: v for k, v in source.items() if k not in dropped}
    temporal = export_temporal_weights(source, recipe.release_temporal, report)
    backbone, heads, origin = map_weights(source, vlm_config.text_config, llm_kind,
                                          {**recipe.release_names, **(head_map or {})}, report)
    # Written whole into DST.partial, then renamed: a killed conversion never leaves a DST that looks complete.
    staging = dst.with_name(dst.name + ".partial")
    config = _rater_config(recipe, heads, vlm_config, str(staging / TEMPORAL_FILE) if temporal else None)
    # Built on the meta device: the target's names and shapes at no cost; the source tensors are
    # then assigned, so an 8B backbone is never allocated twice.
    with torch.device("meta"):
        vlm = InternVLForConditionalGeneration(vlm_config)
    rater = FVQRater(config, vlm, tokenizer, base_path=staging / BACKBONE_DIR)
    expected = vlm.state_dict()
    if vlm_config.tie_word_embeddings:
        # Tied releases may or may not store lm_head; tie_weights() makes it the embedding either way.
        expected.pop("lm_head.weight")
        backbone.pop("lm_head.weight", None)
    problems = _compare(backbone, expected, origin, report) + _compare(heads, rater.heads_state_dict(), origin, report)
    incomplete = [name for name in problems if not name.startswith(("projectors.", "no_face"))]
    if incomplete:
        hint = (" Map the release's score head onto ours: --map SRC_PREFIX=score_head. (head_map), or a recipe whose "
                "release_names and score_head match the release."
                if any(name.startswith("score_head.") for name in incomplete) else "")
        raise ConversionError(f"{len(incomplete)} weight(s) of the backbone or the score head missing or mis-shaped "
                              f"({', '.join(incomplete[:3])}{', ...' if len(incomplete) > 3 else ''}): random weights "
                              "there would make every score meaningless, so no checkpoint is written, even with "
                              "allow_unmatched." + hint, report)
    if not report.clean:
        if not allow_unmatched:
            raise ConversionError(f"the release does not match recipe {recipe.name!r} exactly; nothing was written "
                                  "(allow_unmatched writes it anyway)", report)
        if problems:
            report.notes.append("freshly initialised (not in the release): "
                                + ", ".join(dict.fromkeys(name.rsplit(".", 2)[0] for name in problems)))

    vlm.load_state_dict(backbone, strict=False, assign=True)
    vlm.tie_weights()
    rater.load_state_dict(heads, strict=False)  # heads only: the backbone keys are left as assigned
    shutil.rmtree(staging, ignore_errors=True)
    vlm.save_pretrained(staging / BACKBONE_DIR)
    save_tokenizer(tokenizer, staging / BACKBONE_DIR)
    if temporal:
        (staging / TEMPORAL_FILE).parent.mkdir()
        save_file(temporal, staging / TEMPORAL_FILE)
    rater.save_pretrained(staging, copy_backbone=True)  # heads and config; the backbone is already in place
    (staging / REPORT_FILE).write_text(str(report) + "\n")
    if dst.exists():
        dst.rmdir()  # empty, checked above
    os.replace(staging, dst)
    return report


# Un-merged PEFT keys: "language_model.base_model.model.<name>" wraps <name>; a LoRA-adapted
# module keeps its weight under ".base_layer" and adds "lora_A/lora_B[.<adapter>].weight".
PEFT_WRAPPER = re.compile(r"^(vision_model|language_model)\.base_model\.model\.")
LORA_TENSOR = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(\.[^.]+)?\.weight$")


def merge_peft_lora(source: dict, scaling: float, report: ConversionReport) -> dict:
    """A release's un-merged PEFT tensors as plain weights: wrappers dropped, W + scaling * B @ A merged.

    Merging happens on the release's own (fused qkv / wqkv) weights, before any split, in float32.
    """
    state, pairs = {}, {}
    for key, tensor in source.items():
        key = PEFT_WRAPPER.sub(r"\1.", key)
        match = LORA_TENSOR.match(key)
        if match:
            pairs.setdefault(match["module"], {})[match["part"]] = tensor
        else:
            state[key.replace(".base_layer.", ".")] = tensor
    for module, parts in sorted(pairs.items()):
        weight = f"{module}.weight"
        if set(parts) != {"A", "B"} or weight not in state:
            raise ConversionError(f"LoRA tensors of {module} are incomplete (lora_A and lora_B on a base weight needed; "
                                  f"found {sorted(parts)}{'' if weight in state else ', no base weight'})")
        base, down, up = state[weight], parts["A"], parts["B"]
        if (up.shape[0], down.shape[1]) != tuple(base.shape) or up.shape[1] != down.shape[0]:
            raise ConversionError(f"LoRA of {module}: B {list(up.shape)} @ A {list(down.shape)} does not fit the "
                                  f"weight {list(base.shape)}")
        state[weight] = (base.float() + scaling * (up.float() @ down.float())).to(base.dtype)
    if pairs:
        report.notes.append(f"merged {len(pairs)} un-merged LoRA adapters into their base weights as "
                            f"W + {scaling:g} * B @ A (recipe lora_scaling = alpha / r)")
    return state


def export_temporal_weights(source: dict, prefix: str | None, report: ConversionReport) -> dict | None:
    """The release's SlowFast-R50 blocks 0-4 in pytorchvideo's layout (`blocks.N.`), checked against it.

    They leave `source`; names or shapes that do not fit SlowFast-R50 go to the report.
    """
    if not prefix or not any(key.startswith(prefix) for key in source):
        return None
    from .features.temporal import build_slowfast_r50

    with torch.device("meta"):
        expected = {k: v.shape for k, v in build_slowfast_r50().state_dict().items()}
    weights = {}
    for key in [k for k in source if k.startswith(prefix)]:
        name = "blocks." + key[len(prefix):]
        tensor = source.pop(key)
        if name not in expected:
            report.unmatched_source.append(key)
            report.shapes[key] = tensor.shape
        elif tensor.shape != expected[name]:
            report.shape_mismatches.append(f"{key} {_shape(tensor.shape)} -> SlowFast-R50 {name} expects "
                                           f"{_shape(expected[name])}")
        else:
            weights[name] = tensor.contiguous()
    for name, shape in expected.items():
        if name not in weights and not any(m.split(" ")[0] == prefix + name[len("blocks."):]
                                           for m in report.shape_mismatches):
            report.missing_target.append(f"temporal: {name}")
            report.shapes[f"temporal: {name}"] = shape
    report.mapped += len(weights)
    report.notes.append(f"SlowFast-R50 ({len(weights)} tensors under {prefix}) exported as the temporal stream's "
                        f"weights: {TEMPORAL_FILE}")
    return weights


def _compare(provided: dict, expected: dict, origin: dict, report: ConversionReport) -> list[str]:
    """Sort `provided` target tensors into mapped / unused / mismatched, dropping the unusable ones.

    Returns the expected names left unfilled (missing or mismatched).
    """
    problems = []
    for name in list(provided):
        source = origin[name]
        if name not in expected:
            entry = source if source == name else f"{source} -> {name}"
            report.unmatched_source.append(entry)
            report.shapes[entry] = provided.pop(name).shape
        elif provided[name].shape != expected[name].shape:
            report.shape_mismatches.append(f"{source} {_shape(provided.pop(name).shape)} -> {name} expects "
                                           f"{_shape(expected[name].shape)}")
            problems.append(name)
        else:
            report.mapped += 1
    for name, tensor in expected.items():
        if name not in origin:
            report.missing_target.append(name)
            report.shapes[name] = tensor.shape
            problems.append(name)
    return problems


def _rater_config(recipe: Recipe, heads: dict, vlm_config, temporal_weights: str | None) -> FVQRaterConfig:
    """The converted rater: the recipe's streams, widths read off the release's projectors, no LoRA left."""
    streams = recipe.streams
    fields = {"recipe": recipe, "lora": LoraSettings(r=0)}
    # The stream widths are fixed by the release's projector weights, whatever we would default to.
    for name, stream in (("face_dim", "face"), ("temporal_dim", "temporal")):
        first = next((tensor for key, tensor in heads.items() if key.startswith(f"projectors.{stream}.0.")), None)
        if first is not None:
            fields[name] = first.shape[-1]
    image_size = vlm_config.vision_config.image_size
    fields["features"] = {"streams": list(streams),
                          "image_size": image_size[0] if isinstance(image_size, (list, tuple)) else image_size,
                          "num_frames": recipe.num_frames, "frame_sampling": recipe.frame_sampling,
                          "temporal_preprocess": recipe.temporal, "temporal_weights": temporal_weights}
    return FVQRaterConfig(**fields)


# ----- config -----------------------------------------------------------------------------------


def _read_chat_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path} not found: pass a local directory holding the release "
                              "(huggingface-cli download Human-X/FVQ-Rater --local-dir DIR)")
    chat = json.loads(path.read_text())
    if chat.get("model_type") != "internvl_chat":
        raise ConversionError(f"{path}: model_type is {chat.get('model_type')!r}, not 'internvl_chat' (the original "
                              "InternVL layout this converter reads); a native 'internvl' backbone needs no "
                              "conversion: start from it with FVQRater.from_backbone")
    architecture = (chat.get("llm_config", {}).get("architectures") or [None])[0]
    if architecture not in LLM_KINDS:
        raise ConversionError(f"{path}: unsupported LLM architecture {architecture!r} (supported: {sorted(LLM_KINDS)})")
    # The chat code's defaults (InternVLChatConfig) apply where the file leaves a field out.
    if chat.get("ps_version", "v1") != "v2":
        raise ConversionError(f"{path}: ps_version {chat.get('ps_version', 'v1')!r}; transformers' InternVL only "
                              "implements the 'v2' pixel shuffle, so this release cannot be converted faithfully")
    return chat


def native_config(chat: dict, tokenizer) -> InternVLConfig:
    """transformers' InternVLConfig equivalent to an internvl_chat config.json."""
    vision = chat["vision_config"]
    # Defaults are InternVisionConfig's own, for fields a config file leaves out.
    image_size = chat.get("force_image_size") or vision.get("image_size", 224)
    patch_size = vision.get("patch_size", 14)
    vision_config = InternVLVisionConfig(
        hidden_size=vision["hidden_size"], num_hidden_layers=vision["num_hidden_layers"],
        num_attention_heads=vision["num_attention_heads"], intermediate_size=vision["intermediate_size"],
        attention_bias=vision.get("qkv_bias", False), use_qk_norm=vision.get("qk_normalization", True),
        norm_type=vision.get("norm_type", "rms_norm"), layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
        hidden_act=vision.get("hidden_act", "gelu"), num_channels=vision.get("num_channels", 3),
        initializer_range=vision.get("initializer_range", 0.02), image_size=image_size, patch_size=patch_size)
    text_config = _text_config(chat["llm_config"])
    downsample_ratio = chat.get("downsample_ratio", 0.5)
    context_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["context_image_token"])
    return InternVLConfig(vision_config=vision_config, text_config=text_config, image_token_id=context_id,
                          image_seq_length=int((image_size // patch_size) ** 2 * downsample_ratio ** 2),
                          downsample_ratio=downsample_ratio, vision_feature_layer=chat.get("select_layer", -1),
                          # the chat model drops the CLS token, as the "default" strategy does
                          vision_feature_select_strategy="default", projector_hidden_act="gelu",
                          tie_word_embeddings=text_config.tie_word_embeddings)


def _text_config(llm: dict):
    architecture = llm["architectures"][0]
    if architecture == "InternLM2ForCausalLM":
        # InternLM2 is Llama with fused weights; defaults are InternLM2Config's own.
        heads = llm["num_attention_heads"]
        return LlamaConfig(
            vocab_size=llm["vocab_size"], hidden_size=llm["hidden_size"], intermediate_size=llm["intermediate_size"],
            num_hidden_layers=llm["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=llm.get("num_key_value_heads") or heads, hidden_act=llm.get("hidden_act", "silu"),
            max_position_embeddings=llm.get("max_position_embeddings", 2048),
            rms_norm_eps=llm.get("rms_norm_eps", 1e-6), rope_theta=llm.get("rope_theta", 10000),
            rope_scaling=llm.get("rope_scaling"), attention_bias=llm.get("bias", True), mlp_bias=False,
            initializer_range=llm.get("initializer_range", 0.02), bos_token_id=llm.get("bos_token_id", 1),
            eos_token_id=llm.get("eos_token_id", 2), pad_token_id=llm.get("pad_token_id", 0),
            tie_word_embeddings=llm.get("tie_word_embeddings", False), dtype=llm.get("torch_dtype"))
    # Qwen2/Llama llm_configs are transformers configs already; drop what only steered loading.
    fields = {k: v for k, v in llm.items()
              if k not in ("architectures", "auto_map", "attn_implementation") and not k.startswith("_")}
    return (Qwen2Config if architecture == "Qwen2ForCausalLM" else LlamaConfig).from_dict(fields)


def _config_notes(chat: dict, llm_kind: str, recipe: Recipe) -> list[str]:
    notes = [f"LLM: {chat['llm_config']['architectures'][0]}"
             + (" converted to Llama (wqkv split per key/value group)" if llm_kind == "internlm2" else ""),
             f"recipe {recipe.name!r}: prompt rendered with {recipe.chat_template!r}, score head "
             f"{recipe.score_head!r}, temporal preprocessing {recipe.temporal!r}"]
    rope = chat["llm_config"].get("rope_scaling")
    if rope:
        notes.append(f"rope_scaling {rope} kept as transformers' equivalent")
    return notes


# ----- weights ----------------------------------------------------------------------------------


def read_weights(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors or of the shards its index lists."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (src / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConversionError(f"no model.safetensors or model.safetensors.index.json in {src} (a .bin release "
                              "needs converting to safetensors first)")
    absent = [name for name in files if not (src / name).is_file()]
    if absent:
        raise ConversionError(f"{index} lists shards that are not in {src}: {absent}")
    state = {}
    for name in files:
        state.update(load_file(src / name))
    return state


def map_weights(source: dict, text_config, llm_kind: str, head_map: dict, report: ConversionReport):
    """Split source tensors into native backbone tensors and our head tensors, by target name.

    Returns (backbone, heads, origin), origin mapping each target name to its source key. Source
    keys that are neither go to report.unmatched_source.
    """
    backbone, heads, origin = {}, {}, {}
    for key, tensor in source.items():
        head = _head_name(key, head_map)
        if head is not None:
            if head in heads:
                raise ConversionError(f"both {origin[head]!r} and {key!r} map to {head!r}: check head_map")
            heads[head], origin[head] = tensor, key
        elif key.startswith(BACKBONE_PREFIXES):
            for name, part in _backbone_tensors(key, tensor, text_config, llm_kind).items():
                backbone[name], origin[name] = part, key
        else:
            report.unmatched_source.append(key)
            report.shapes[key] = tensor.shape
    if any("lora_" in key for key in report.unmatched_source):
        report.notes.append("the release holds LoRA tensors this converter cannot merge (only lora_A/lora_B pairs on a "
                            "base weight are; not e.g. lora_embedding_* or DoRA magnitudes)")
    return backbone, heads, origin


def _head_name(key: str, head_map: dict) -> str | None:
    """Our name for a source key of FVQ-Rater's own modules, or None."""
    prefixes = [prefix for prefix in head_map if key.startswith(prefix)]
    if prefixes:
        prefix = max(prefixes, key=len)
        return head_map[prefix] + key[len(prefix):]
    if key == "no_face" or key.startswith(("projectors.", "score_head.")):
        return key
    return None


def _backbone_tensors(key: str, tensor: torch.Tensor, text_config, llm_kind: str) -> dict[str, torch.Tensor]:
    """Native name(s) and tensor(s) for one backbone key of the chat layout."""
    if key.startswith("vision_model."):
        name = _rename(key, VISION_RENAMES)
        if ".attention.qkv." in name:
            return {name.replace(".qkv.", f".{p}_proj."): t for p, t in zip("qkv", split_vision_qkv(tensor))}
        return {name: tensor}
    if key.startswith("mlp1."):
        return {_rename(key, PROJECTOR_RENAMES): tensor}
    if llm_kind != "internlm2":
        return {_rename(key, LLM_RENAMES): tensor}
    name = _rename(key, INTERNLM2_RENAMES)
    if ".attention.wqkv." in name:
        parts = split_internlm2_wqkv(tensor, text_config.num_attention_heads, text_config.num_key_value_heads)
        return {name.replace(".attention.wqkv.", f".self_attn.{p}_proj."): t for p, t in zip("qkv", parts)}
    return {name: tensor}


def _rename(key: str, rules) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def split_vision_qkv(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InternViT's fused qkv weight or bias: rows [q; k; v]."""
    # clone: views of one storage would be saved as shared tensors
    return tuple(part.clone() for part in tensor.chunk(3, dim=0))


def split_internlm2_wqkv(tensor: torch.Tensor, num_heads: int, num_kv_heads: int):
    """InternLM2's fused wqkv (weight or bias) -> q, k, v.

    Its rows are grouped per key/value head: for each of the num_kv_heads groups, the group's
    num_heads // num_kv_heads query heads, then its key head, then its value head (head_dim rows each).
    """
    groups = num_heads // num_kv_heads
    rows, rest = tensor.shape[0], tensor.shape[1:]
    if num_heads % num_kv_heads or rows % (num_heads + 2 * num_kv_heads):
        raise ConversionError(f"wqkv with {rows} rows does not fit {num_heads} heads and {num_kv_heads} kv heads")
    grouped = tensor.reshape(num_kv_heads, groups + 2, rows // (num_heads + 2 * num_kv_heads), *rest)
    return (grouped[:, :groups].reshape(-1, *rest).clone(), grouped[:, groups].reshape(-1, *rest).clone(),
            grouped[:, groups + 1].reshape(-1, *rest).clone())


# ----- tokenizer --------------------------------------------------------------------------------


def load_tokenizer(src: Path):
    """The release's tokenizer with InternVL's image tokens named; no remote code is run."""
    vocab = _open_tokenizer(src).get_vocab()
    if IMAGE_TOKENS["context_image_token"] not in vocab:
        raise ConversionError(f"the tokenizer in {src} has no {IMAGE_TOKENS['context_image_token']} token, which "
                              "InternVL uses for image positions")
    # Opened again to name the tokens; only those the vocabulary has, so no new ids appear.
    return _open_tokenizer(src, extra_special_tokens={n: t for n, t in IMAGE_TOKENS.items() if t in vocab})


def _open_tokenizer(src: Path, **options):
    try:
        # trust_remote_code=False: refuse custom code without transformers' interactive prompt.
        return AutoTokenizer.from_pretrained(src, trust_remote_code=False, **options)
    except (OSError, ValueError, ImportError) as error:
        if (src / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(src, **options)
        raise ConversionError(
            f"transformers cannot load the tokenizer in {src} natively ({type(error).__name__}: {error}). An "
            "InternLM2-based release ships a custom InternLM2Tokenizer: load it once with trust_remote_code=True "
            "in an environment that has its code, save a fast tokenizer (tokenizer.json) into this directory "
            "(e.g. via transformers' convert_slow_tokenizer), and check that it encodes text exactly as the "
            "original does, then convert again") from error


def save_tokenizer(tokenizer, directory: Path):
    tokenizer.save_pretrained(directory)
    # A release's auto_map points at custom tokenizer code that the converted folder does not have.
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if config.pop("auto_map", None) is not None:
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


# ----- command line -----------------------------------------------------------------------------


def parse_maps(maps: list[str]) -> dict[str, str]:
    """["SRC_PREFIX=OUR_PREFIX", ...] -> {SRC_PREFIX: OUR_PREFIX}."""
    head_map = {}
    for item in maps or []:
        source, sep, target = item.partition("=")
        if not sep or not source or not target:
            raise ConversionError(f"--map {item!r}: expected SRC_PREFIX=OUR_PREFIX, e.g. face_mlp.=projectors.face.")
        if source in head_map:
            raise ConversionError(f"--map: {source!r} is mapped twice")
        head_map[source] = target
    return head_map


def main_convert(src, dst, maps: list[str], recipe: Recipe, allow_unmatched: bool = False) -> int:
    """`fvq-rater convert SRC DST [--recipe R | --recipe-file F] [--map A=B ...] [--allow-unmatched]`:
    print the report, 0 on success."""
    try:
        report = convert_checkpoint(src, dst, parse_maps(maps), allow_unmatched, recipe=recipe)
    except ConversionError as error:
        print(f"conversion failed: {error}", file=sys.stderr)
        return 1
    print(report)
    print(f"FVQ-Rater checkpoint written to {dst} (report in {Path(dst) / REPORT_FILE})")
    return 0
