"""Released-weights conversion, on synthetic checkpoints written in the original InternVL-chat layout.

A tiny random FVQ-Rater is written the way OpenGVLab's InternVL code stores it (fused qkv, chat
names, InternLM2's grouped wqkv), with its heads under made-up release names; converting it back
must give a checkpoint that predicts exactly what the original did.
"""
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from fvq_plugin.convert import (ConversionError, convert_checkpoint, main_convert, parse_maps, split_internlm2_wqkv,
                                split_vision_qkv)
from fvq_plugin.model import FVQRater, FVQRaterConfig, LoraSettings
from fvq_plugin.recipe import FVQ
from fvq_plugin.tiny import tiny_backbone_config, tiny_tokenizer

FRAMES = 2
RECIPE = FVQ.derive(num_frames=FRAMES)
# Release prefix -> ours: the kind of names an unknown release might use.
HEAD_MAP = {"portrait_proj.": "projectors.portrait.", "face_proj.": "projectors.face.",
            "motion_proj.": "projectors.temporal.", "no_face_token": "no_face", "quality_head.": "score_head."}

# Native -> chat names (the inverse of the conversion, written independently of it).
VISION_TO_CHAT = [("model.vision_tower.", "vision_model."), (".encoder.layer.", ".encoder.layers."),
                  (".embeddings.cls_token", ".embeddings.class_embedding"),
                  (".embeddings.position_embeddings", ".embeddings.position_embedding"),
                  (".patch_embeddings.projection.", ".patch_embedding."), (".lambda_1", ".ls1"), (".lambda_2", ".ls2"),
                  (".attention.projection_layer.", ".attn.proj."), (".attention.", ".attn."),
                  (".layernorm_before.", ".norm1."), (".layernorm_after.", ".norm2.")]
PROJECTOR_TO_CHAT = [("model.multi_modal_projector.layer_norm.", "mlp1.0."),
                     ("model.multi_modal_projector.linear_1.", "mlp1.1."),
                     ("model.multi_modal_projector.linear_2.", "mlp1.3.")]
INTERNLM2_TO_CHAT = [("model.language_model.embed_tokens.", "language_model.model.tok_embeddings."),
                     ("model.language_model.", "language_model.model."), (".self_attn.o_proj.", ".attention.wo."),
                     (".mlp.gate_proj.", ".feed_forward.w1."), (".mlp.up_proj.", ".feed_forward.w3."),
                     (".mlp.down_proj.", ".feed_forward.w2."), (".input_layernorm.", ".attention_norm."),
                     (".post_attention_layernorm.", ".ffn_norm.")]


def _replace(key, pairs):
    for old, new in pairs:
        key = key.replace(old, new)
    return key


def fuse_internlm2_wqkv(q, k, v, num_kv_heads):
    """InternLM2's row order: per key/value group, its query heads, then its key head, its value head."""
    grouped = [t.reshape(num_kv_heads, -1, k.shape[0] // num_kv_heads, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(grouped, dim=1).reshape(-1, *q.shape[1:])


def chat_state(model, internlm2, head_names=HEAD_MAP):
    """The backbone in the InternVL-chat layout and the heads under release names ({release prefix: ours})."""
    native = model.vlm.state_dict()
    kv_heads = model.vlm.config.text_config.num_key_value_heads
    out = {}
    for key, tensor in native.items():
        fused = key.startswith("model.vision_tower.") or internlm2
        if fused and (".k_proj." in key or ".v_proj." in key):
            continue  # fused with q_proj below
        if key.startswith("model.vision_tower."):
            if ".attention.q_proj." in key:
                tensor = torch.cat([tensor, native[key.replace("q_proj", "k_proj")],
                                    native[key.replace("q_proj", "v_proj")]])
                key = key.replace("q_proj", "qkv")
            key = _replace(key, VISION_TO_CHAT)
        elif key.startswith("model.multi_modal_projector."):
            key = _replace(key, PROJECTOR_TO_CHAT)
        elif internlm2:
            if ".self_attn.q_proj." in key:
                tensor = fuse_internlm2_wqkv(tensor, native[key.replace("q_proj", "k_proj")],
                                             native[key.replace("q_proj", "v_proj")], kv_heads)
                key = key.replace("self_attn.q_proj", "attention.wqkv")
            key = "language_model.output.weight" if key == "lm_head.weight" else _replace(key, INTERNLM2_TO_CHAT)
        else:
            key = "language_model.lm_head.weight" if key == "lm_head.weight" else key.replace(
                "model.language_model.", "language_model.model.")
        out[key] = tensor.clone()
    for key, tensor in model.heads_state_dict().items():
        release, ours = next((r, o) for r, o in head_names.items() if key.startswith(o))
        out[release + key[len(ours):]] = tensor.clone()
    return out


def chat_config(model, internlm2):
    config = model.vlm.config
    vision, text = config.vision_config, config.text_config
    if internlm2:
        llm = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
               "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
               **{k: getattr(text, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                                "num_attention_heads", "num_key_value_heads", "hidden_act",
                                                "max_position_embeddings", "rms_norm_eps")},
               "rope_theta": text.rope_parameters["rope_theta"], "rope_scaling": None, "bias": False,
               "tie_word_embeddings": False, "attn_implementation": "eager"}
    else:
        llm = {**text.to_dict(), "architectures": ["Qwen2ForCausalLM"], "attn_implementation": "flash_attention_2"}
    return {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "internlm2-chat",
            "downsample_ratio": config.downsample_ratio, "force_image_size": vision.image_size[0],
            "select_layer": config.vision_feature_layer, "ps_version": "v2", "llm_config": llm,
            "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                              "hidden_size": vision.hidden_size, "num_hidden_layers": vision.num_hidden_layers,
                              "num_attention_heads": vision.num_attention_heads,
                              "intermediate_size": vision.intermediate_size, "qkv_bias": vision.attention_bias,
                              "qk_normalization": vision.use_qk_norm, "norm_type": vision.norm_type,
                              "layer_norm_eps": vision.layer_norm_eps, "image_size": vision.image_size[0],
                              "patch_size": vision.patch_size[0], "drop_path_rate": 0.0, "initializer_factor": 1.0}}


def write_release(directory, model, internlm2=False, shards=1, drop=(), extra=None, head_names=HEAD_MAP):
    directory.mkdir()
    state = {k: v for k, v in chat_state(model, internlm2, head_names).items() if not k.startswith(tuple(drop))}
    state.update(extra or {})
    if shards == 1:
        save_file(state, directory / "model.safetensors")
    else:
        keys, weight_map = sorted(state), {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = keys[i::shards]
            save_file({k: state[k] for k in part}, directory / name)
            weight_map.update(dict.fromkeys(part, name))
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(chat_config(model, internlm2)))
    model.tokenizer.save_pretrained(directory)
    if internlm2:
        # Like an InternLM2 release: custom tokenizer code (not run here), plus a fast tokenizer.json.
        path = directory / "tokenizer_config.json"
        config = json.loads(path.read_text())
        config.update(tokenizer_class="InternLM2Tokenizer",
                      auto_map={"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]})
        path.write_text(json.dumps(config))
    return directory


def original(internlm2):
    tokenizer = tiny_tokenizer()
    vlm_config = tiny_backbone_config(tokenizer)
    vlm_config.vision_config.attention_bias = True  # InternViT-300M style: a qkv bias to split
    if internlm2:
        # InternViT-6B style vision, and an LLM with 4 query heads per key/value head
        vlm_config.vision_config.use_qk_norm, vlm_config.vision_config.norm_type = True, "rms_norm"
        vlm_config.text_config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                             num_key_value_heads=2, intermediate_size=128, vocab_size=len(tokenizer),
                                             max_position_embeddings=4096, tie_word_embeddings=False)
    model = FVQRater.random(FVQRaterConfig(recipe=RECIPE, face_dim=128, lora=LoraSettings(r=0)), vlm_config, tokenizer)
    with torch.no_grad():  # heads away from their init (a zero last layer would hide any mix-up)
        for name, parameter in model.named_parameters():
            if not name.startswith("backbone."):
                parameter.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def qwen2_model():
    return original(internlm2=False)


@pytest.fixture(scope="module")
def internlm2_model():
    return original(internlm2=True)


def batch(model):
    generator = torch.Generator().manual_seed(1)
    size = model.image_size
    return {"pixel_values": torch.randn(2, FRAMES, 3, *size, generator=generator),
            "portrait_values": torch.randn(2, FRAMES, 3, *size, generator=generator),
            "face_embeds": torch.randn(2, FRAMES, 128, generator=generator),
            "face_mask": torch.tensor([[1, 0], [1, 1]]),  # the second frame of video 0 has no face
            "temporal": torch.randn(2, 2304, generator=generator)}


def assert_same_predictions(model, directory):
    converted = FVQRater.from_pretrained(directory, merge_lora=False)
    inputs = batch(model)
    with torch.no_grad():
        expected, got = model(**inputs), converted(**inputs)
    assert torch.equal(got.logits, expected.logits)
    assert torch.equal(got.score, expected.score)
    return converted


@pytest.mark.parametrize("layout", ["qwen2-single-file", "internlm2-sharded"])
def test_conversion_reproduces_the_original(tmp_path, request, layout):
    internlm2 = layout.startswith("internlm2")
    model = request.getfixturevalue("internlm2_model" if internlm2 else "qwen2_model")
    src = write_release(tmp_path / "release", model, internlm2, shards=2 if internlm2 else 1)
    report = convert_checkpoint(src, tmp_path / "converted", HEAD_MAP, recipe=RECIPE)
    assert report.clean, str(report)
    assert report.mapped == len(model.vlm.state_dict()) + len(model.heads_state_dict())

    converted = assert_same_predictions(model, tmp_path / "converted")
    saved = json.loads((tmp_path / "converted" / "fvq_rater.json").read_text())
    assert saved["backbone"] == "backbone" and saved["lora"]["r"] == 0 and not converted.has_lora
    assert (saved["face_dim"], saved["temporal_dim"]) == (128, 2304)  # read off the projector weights
    assert saved["recipe"] == RECIPE.to_dict() | {"release_unused": list(RECIPE.release_unused)}
    assert saved["features"] == {"streams": list(saved["streams"]), "image_size": 64, "num_frames": FRAMES,
                                 "frame_sampling": "internvl", "temporal_preprocess": "finevq", "temporal_weights": None}
    assert converted.tokenizer.context_image_token == "<IMG_CONTEXT>"
    tokenizer_config = json.loads((tmp_path / "converted" / "backbone" / "tokenizer_config.json").read_text())
    assert "auto_map" not in tokenizer_config  # the custom InternLM2 tokenizer code is not carried over


def test_unknown_and_missing_keys_fail_strictly(tmp_path, qwen2_model, capsys):
    src = write_release(tmp_path / "release", qwen2_model, drop=("motion_proj.",),
                        extra={"aux_head.weight": torch.zeros(3, 4)})
    with pytest.raises(ConversionError) as caught:
        convert_checkpoint(src, tmp_path / "converted", HEAD_MAP, recipe=RECIPE)
    report = caught.value.report
    assert report.unmatched_source == ["aux_head.weight"]
    assert report.missing_target == [f"projectors.temporal.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")]
    assert "aux_head.weight  [3, 4]" in str(caught.value)
    assert not (tmp_path / "converted").exists()

    maps = [f"{k}={v}" for k, v in HEAD_MAP.items()]
    assert main_convert(src, tmp_path / "converted", maps, RECIPE) == 1
    assert "aux_head.weight" in capsys.readouterr().err


def test_allow_unmatched_writes_the_report(tmp_path, qwen2_model):
    src = write_release(tmp_path / "release", qwen2_model, drop=("motion_proj.",),
                        extra={"aux_head.weight": torch.zeros(3, 4)})
    dst = tmp_path / "converted"
    report = convert_checkpoint(src, dst, HEAD_MAP, allow_unmatched=True, recipe=RECIPE)
    assert not report.clean
    written = (dst / "conversion_report.txt").read_text()
    assert "aux_head.weight" in written and "projectors.temporal.0.weight" in written
    assert "freshly initialised (not in the release): projectors.temporal" in written
    FVQRater.from_pretrained(dst)  # loads; its temporal projector is untrained


def test_missing_score_head_is_refused_even_when_allowed(tmp_path, qwen2_model):
    src = write_release(tmp_path / "release", qwen2_model, drop=("quality_head.",))
    with pytest.raises(ConversionError, match="score head") as caught:
        convert_checkpoint(src, tmp_path / "converted", HEAD_MAP, allow_unmatched=True, recipe=RECIPE)
    assert "score_head.fc1.weight" in caught.value.report.missing_target
    assert not (tmp_path / "converted").exists()


def test_release_names_equal_to_ours_need_no_map(tmp_path, qwen2_model):
    src = write_release(tmp_path / "release", qwen2_model, head_names={p: p for p in HEAD_MAP.values()})
    assert convert_checkpoint(src, tmp_path / "converted", recipe=RECIPE).clean
    assert_same_predictions(qwen2_model, tmp_path / "converted")


def test_internlm2_tokenizer_without_fast_file_is_explained(tmp_path, internlm2_model):
    src = write_release(tmp_path / "release", internlm2_model, internlm2=True)
    (src / "tokenizer.json").unlink()
    with pytest.raises(ConversionError, match="InternLM2Tokenizer.*trust_remote_code"):
        convert_checkpoint(src, tmp_path / "converted", HEAD_MAP, recipe=RECIPE)


def test_qkv_splits_round_trip():
    q, k, v = torch.randn(3, 32, 16).unbind(0)
    assert all(torch.equal(a, b) for a, b in zip(split_vision_qkv(torch.cat([q, k, v])), (q, k, v)))
    bias = torch.randn(96)
    assert torch.equal(torch.cat(split_vision_qkv(bias)), bias)

    heads, kv_heads, head_dim, width = 8, 2, 4, 16
    q, (k, v) = torch.randn(heads * head_dim, width), torch.randn(2, kv_heads * head_dim, width).unbind(0)
    parts = split_internlm2_wqkv(fuse_internlm2_wqkv(q, k, v, kv_heads), heads, kv_heads)
    assert all(torch.equal(a, b) for a, b in zip(parts, (q, k, v)))
    q, (k, v) = torch.randn(heads * head_dim), torch.randn(2, kv_heads * head_dim).unbind(0)  # a bias
    parts = split_internlm2_wqkv(fuse_internlm2_wqkv(q, k, v, kv_heads), heads, kv_heads)
    assert all(torch.equal(a, b) for a, b in zip(parts, (q, k, v)))
    # The layout is grouped, not [q; k; v]: group 0's key head follows its 4 query heads.
    fused = fuse_internlm2_wqkv(q, k, v, kv_heads)
    assert torch.equal(fused[4 * head_dim:5 * head_dim], k[:head_dim])
    with pytest.raises(ConversionError):
        split_internlm2_wqkv(torch.randn(50, width), heads, kv_heads)


def test_parse_maps():
    assert parse_maps(["face_mlp.=projectors.face.", "head=score_head"]) == {"face_mlp.": "projectors.face.",
                                                                             "head": "score_head"}
    for bad in (["face_mlp."], ["=score_head."], ["a.=b.", "a.=c."]):
        with pytest.raises(ConversionError):
            parse_maps(bad)
