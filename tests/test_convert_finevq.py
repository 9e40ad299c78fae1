"""FineVQ's released layout, converted exactly: a synthetic tiny checkpoint in FineVQ's key names and
shapes (un-merged PEFT LoRA, mlp1, motion_mlp, mlpscore.fc1..fc5 plus its unused ln1, SlowFast under
slowfast_model.feature_extraction), checked against computations written here from FineVQ's code."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from fvq_plugin.convert import ConversionError, convert_checkpoint
from fvq_plugin.model import FVQRater, FVQRaterConfig, LoraSettings
from fvq_plugin.recipe import FINEVQ, FVQ
from fvq_plugin.tiny import tiny_backbone_config, tiny_tokenizer
from test_convert import chat_config, chat_state

FRAMES, RANK, SCALING = 2, 4, 2.0  # FineVQ: lora_alpha = 2 * r
RECIPE = FINEVQ.derive(num_frames=FRAMES)
RELEASE_HEADS = {"motion_mlp.": "projectors.temporal.", "mlpscore.": "score_head."}
LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2",  # FineVQ's vision LoRA targets
                "attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def finevq_model():
    tokenizer = tiny_tokenizer()
    vlm_config = tiny_backbone_config(tokenizer)
    vlm_config.vision_config.attention_bias = True  # InternViT-300M: a qkv bias
    vlm_config.text_config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                         num_key_value_heads=2, intermediate_size=128, vocab_size=len(tokenizer),
                                         max_position_embeddings=4096, tie_word_embeddings=False)
    model = FVQRater.random(FVQRaterConfig(streams=("spatial", "temporal"), recipe=RECIPE, lora=LoraSettings(r=0)),
                            vlm_config, tokenizer)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.startswith("backbone."):
                parameter.normal_(0, 0.3)
        model.score_head.fc5.weight.abs_()  # a ReLU output away from zero
        model.score_head.fc5.bias.fill_(0.3)
    return model.eval()


def peft_layout(chat: dict, generator) -> tuple[dict, dict]:
    """FineVQ's saved keys (PEFT-wrapped, LoRA un-merged) and, for the test, each adapted weight merged."""
    release, merged = {}, {}
    for key, tensor in chat.items():
        tower = key.split(".")[0]
        if tower not in ("vision_model", "language_model"):
            release[key] = tensor
            continue
        wrapped = key.replace(f"{tower}.", f"{tower}.base_model.model.", 1)
        module, kind = key.rsplit(".", 1)
        if not module.endswith(LORA_TARGETS):
            release[wrapped] = tensor
            continue
        release[wrapped.replace(f".{kind}", f".base_layer.{kind}")] = tensor
        if kind == "weight":
            down = torch.randn(RANK, tensor.shape[1], generator=generator) * 0.1
            up = torch.randn(tensor.shape[0], RANK, generator=generator) * 0.1
            release[wrapped.replace(".weight", ".lora_A.default.weight")] = down
            release[wrapped.replace(".weight", ".lora_B.default.weight")] = up
            merged[key] = tensor + SCALING * up @ down
    return release, merged


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from fvq_plugin.features.temporal import build_slowfast_r50

    model = finevq_model()
    generator = torch.Generator().manual_seed(7)
    chat = chat_state(model, internlm2=True, head_names=RELEASE_HEADS)
    state, merged = peft_layout(chat, generator)
    state["mlpscore.ln1.weight"], state["mlpscore.ln1.bias"] = torch.ones(1024), torch.zeros(1024)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        slowfast = build_slowfast_r50().state_dict()
    state.update({f"slowfast_model.feature_extraction.{k[len('blocks.'):]}": v for k, v in slowfast.items()})
    directory = tmp_path_factory.mktemp("finevq") / "FineVQ_score"
    directory.mkdir()
    save_file(state, directory / "model.safetensors")
    config = chat_config(model, internlm2=True)
    config.update(template="internlm2-chat", use_llm_lora=RANK, use_backbone_lora=RANK)
    (directory / "config.json").write_text(json.dumps(config))
    model.tokenizer.save_pretrained(directory)
    return {"dir": directory, "model": model, "state": state, "chat": chat, "merged": merged, "slowfast": slowfast}


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "fvq"
    report = convert_checkpoint(release["dir"], out, recipe=RECIPE)
    return out, report


def test_finevq_layout_converts_with_nothing_unused_or_missing(converted):
    out, report = converted
    assert report.clean and not report.unmatched_source and not report.missing_target, str(report)
    text = (out / "conversion_report.txt").read_text()
    assert "mlpscore.ln1.bias, mlpscore.ln1.weight" in text  # dropped explicitly, and said
    assert "merged 18 un-merged LoRA adapters" in text
    saved = json.loads((out / "fvq_rater.json").read_text())
    assert saved["streams"] == ["spatial", "temporal"] and saved["recipe"]["name"] == RECIPE.name
    assert saved["features"]["temporal_weights"] == "temporal/slowfast_r50.safetensors"  # relative: the folder moves


def test_merged_weights_are_base_plus_lora_delta(release, converted):
    out, _ = converted
    loaded = FVQRater.from_pretrained(out, merge_lora=False)
    back = chat_state(loaded, internlm2=True, head_names=RELEASE_HEADS)
    for key, expected in release["merged"].items():
        assert torch.allclose(back[key], expected, atol=1e-6), key
    untouched = [k for k in release["chat"] if k not in release["merged"]]
    assert untouched and all(torch.equal(back[k], release["chat"][k]) for k in untouched)


def test_slowfast_is_exported_as_the_temporal_weights(release, converted):
    out, _ = converted
    exported = load_file(out / "temporal" / "slowfast_r50.safetensors")
    assert exported.keys() == release["slowfast"].keys()
    assert all(torch.equal(exported[k], release["slowfast"][k]) for k in exported)


def reference_score(state: dict, model: FVQRater, batch: dict) -> torch.Tensor:
    """FineVQ's forward: the whole answer "... is good.<|im_end|>" in the sequence, hidden_states[-1][:, -4],
    then its mlpscore (ReLU after every fc) from the release's own tensors."""
    vlm, tokenizer = model.vlm, model.tokenizer
    answer = tokenizer(" good.<|im_end|>", add_special_tokens=False).input_ids
    ids = torch.cat([model.prompt_ids, torch.tensor(answer)]).expand(len(batch["temporal"]), -1)
    embeds = vlm.get_input_embeddings()(ids)
    frames = batch["pixel_values"].flatten(0, 1)
    vision = vlm.model.get_image_features(pixel_values=frames).pooler_output.reshape(len(ids), -1, embeds.shape[-1])
    motion = torch.nn.functional.layer_norm(batch["temporal"], (2304,), state["motion_mlp.0.weight"],
                                            state["motion_mlp.0.bias"])
    motion = torch.nn.functional.gelu(motion @ state["motion_mlp.1.weight"].T + state["motion_mlp.1.bias"])
    motion = motion @ state["motion_mlp.3.weight"].T + state["motion_mlp.3.bias"]
    context = ids == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    # FineVQ: every context token but the last takes a ViT embedding, the last one the motion embedding.
    values = torch.cat([vision, motion.unsqueeze(1)], 1)
    embeds = embeds.masked_scatter(context.unsqueeze(-1), values)
    hidden = vlm.model.language_model(inputs_embeds=embeds).last_hidden_state[:, -4]
    for i in range(1, 6):
        hidden = torch.relu(hidden @ state[f"mlpscore.fc{i}.weight"].T + state[f"mlpscore.fc{i}.bias"])
    return hidden.squeeze(-1) * 100


def test_converted_score_equals_finevqs_computation(release, converted):
    out, _ = converted
    model = FVQRater.from_pretrained(out)  # LoRA merged, as for scoring
    generator = torch.Generator().manual_seed(5)
    batch = {"pixel_values": torch.randn(2, FRAMES, 3, *model.image_size, generator=generator),
             "temporal": torch.randn(2, 2304, generator=generator)}
    with torch.no_grad():
        ours, reference = model(**batch).score, reference_score(release["state"], model, batch)
    assert (reference > 0).all() and torch.allclose(ours, reference, atol=1e-4)


def test_the_fvq_recipe_on_finevqs_layout_names_what_does_not_match(release, tmp_path):
    with pytest.raises(ConversionError) as caught:
        convert_checkpoint(release["dir"], tmp_path / "out", recipe=FVQ.derive(num_frames=FRAMES))
    report = str(caught.value)
    assert "projectors.portrait.1.weight  [64, 128]" in report and "projectors.face.0.weight  [512]" in report
    assert "no_face  [64]" in report and not (tmp_path / "out").exists()


def test_a_moved_checkpoint_loads_and_scores_identically(converted, tmp_path):
    import shutil

    out, _ = converted
    moved = tmp_path / "elsewhere" / "fvq"
    shutil.copytree(out, moved)
    first, second = FVQRater.from_pretrained(out), FVQRater.from_pretrained(moved)
    assert second.config.features["temporal_weights"] == str(moved / "temporal" / "slowfast_r50.safetensors")
    generator = torch.Generator().manual_seed(9)
    batch = {"pixel_values": torch.randn(1, FRAMES, 3, *first.image_size, generator=generator),
             "temporal": torch.randn(1, 2304, generator=generator)}
    with torch.no_grad():
        assert torch.equal(first(**batch).score, second(**batch).score)


def test_a_moved_checkpoint_resumes_its_results_file(converted, tmp_path):
    import shutil

    from fvq_plugin.scoring import Scorer

    out, _ = converted
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    assert Scorer.from_pretrained(out).fingerprint == Scorer.from_pretrained(moved).fingerprint
    assert Scorer.from_pretrained(out, merge_lora=False).fingerprint == Scorer.from_pretrained(out).fingerprint  # no LoRA


def test_a_release_naming_another_template_is_refused(release, tmp_path):
    import shutil

    src = tmp_path / "release"
    shutil.copytree(release["dir"], src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "template": "Hermes-2"}))
    with pytest.raises(ConversionError, match="names the conversation template 'Hermes-2'.*internlm2-chat"):
        convert_checkpoint(src, tmp_path / "out", recipe=RECIPE)


@pytest.mark.reliability
def test_a_config_path_cannot_leave_the_checkpoint(converted, tmp_path):
    import shutil

    from fvq_plugin.model import CheckpointError

    out, _ = converted
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    config = json.loads((copy / "fvq_rater.json").read_text())
    config["features"]["temporal_weights"] = "../../etc/passwd"
    (copy / "fvq_rater.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="temporal_weights '../../etc/passwd' points outside the checkpoint"):
        FVQRater.from_pretrained(copy)


def test_cli_converts_with_recipe_finevq_and_scores_as_finevq_computes(release, tmp_path, capsys):
    """The acceptance path: `fvq-rater convert SRC OUT --recipe finevq`, then `fvq-rater score --weights OUT v.mp4`."""
    import numpy as np

    from fvq_plugin import cli
    from fvq_plugin.features import model_inputs
    from fvq_plugin.scoring import Scorer, extract_features
    from fvq_plugin.video import write_video

    out = tmp_path / "ckpt"
    assert cli.main(["convert", str(release["dir"]), str(out), "--recipe", "finevq"]) == 0
    printed = capsys.readouterr().out
    assert "result: clean" in printed and "not used" not in printed and "missing" not in printed
    video = tmp_path / "face.mp4"
    rng = np.random.default_rng(0)
    write_video(video, [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(36)], fps=12)
    cache = tmp_path / "cache"
    assert cli.main(["score", str(video), "--weights", str(out), "--json", "--cache", str(cache)]) == 0
    scored = json.loads(capsys.readouterr().out)[0]["score"]

    scorer = Scorer.from_pretrained(out)
    assert scorer.model.config.recipe == FINEVQ and scorer.extractor.temporal.mode == "finevq"
    features = [item.features for batch in extract_features([video], scorer.extractor, cache, progress=False)
                for item in batch]
    assert features[0]["info"]["n_frames"] == 36
    batch = model_inputs(features, scorer.extractor.preparer.spatial)
    with torch.no_grad():
        reference = reference_score(release["state"], scorer.model, batch)
    assert scored == pytest.approx(min(reference.item(), 100.0), abs=1e-3)


@pytest.mark.reliability
def test_an_interrupted_conversion_leaves_no_checkpoint_that_looks_complete(release, tmp_path, monkeypatch):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(FVQRater, "save_pretrained", interrupted)
        with pytest.raises(KeyboardInterrupt):
            convert_checkpoint(release["dir"], tmp_path / "out", recipe=RECIPE)
    assert not (tmp_path / "out").exists() and (tmp_path / "out.partial" / "backbone").is_dir()
    assert convert_checkpoint(release["dir"], tmp_path / "out", recipe=RECIPE).clean  # the leftover is replaced
    assert not (tmp_path / "out.partial").exists() and FVQRater.from_pretrained(tmp_path / "out").config.streams
