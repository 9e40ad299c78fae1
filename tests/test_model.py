import pytest
import torch

from fvq_plugin.common import LEVELS, STREAMS
from fvq_plugin.model import (CheckpointError, FVQRater, FVQRaterConfig, FVQRaterOutput, LoraSettings,
                              answer_text, level_index)
from fvq_plugin.tiny import tiny_rater


def random_batch(model, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    frames, (height, width) = model.config.num_frames, model.image_size
    return {"pixel_values": torch.randn(batch, frames, 3, height, width, generator=generator),
            "portrait_values": torch.randn(batch, frames, 3, height, width, generator=generator),
            "face_embeds": torch.randn(batch, frames, model.config.face_dim, generator=generator),
            "face_mask": torch.rand(batch, frames, generator=generator) > 0.3,
            "temporal": torch.randn(batch, model.config.temporal_dim, generator=generator)}


def perturb_trainable(model, seed=1):
    """LoRA B matrices and the head start at zero; give every trainable tensor a value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


@pytest.fixture(scope="module")
def model(extractor):
    return tiny_rater(extractor)


def test_only_lora_projectors_and_head_train(model):
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith(("projectors.", "score_head.", "no_face")) for n in trainable)
    lora = [n for n in trainable if "lora_" in n]
    assert any("vision_tower" in n for n in lora) and any("language_model" in n for n in lora)
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert any("embed_tokens" in n for n in frozen) and any("patch_embeddings" in n for n in frozen)


def test_forward_backward_reaches_every_trainable_tensor(model):
    model.train()
    output = model(**random_batch(model))
    assert output.score.shape == (2,) and output.level_logits.shape == (2, len(LEVELS))
    (output.score.sum() + output.level_logits.logsumexp(-1).sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    model.zero_grad()


def test_prompt_reserves_positions_for_every_stream(model):
    counts = {s: int((model.stream_map == 1 + STREAMS.index(s)).sum()) for s in STREAMS}
    frames = model.config.num_frames
    assert counts == {"spatial": frames * model.tokens_per_frame, "portrait": frames * model.tokens_per_frame,
                      "face": frames, "temporal": 1}
    assert model.prompt_text().endswith("How would you rate the overall quality of this video?<|im_end|>"
                                        "<|im_start|>assistant\nThe video quality is")


def test_untrained_head_answers_mid_scale(model):
    assert torch.allclose(model(**random_batch(model)).score, torch.tensor(50.0))


def test_streams_can_be_switched_off(extractor):
    model = tiny_rater(extractor, streams=("spatial", "temporal"))
    batch = random_batch(model)
    assert model(pixel_values=batch["pixel_values"], temporal=batch["temporal"]).score.shape == (2,)
    assert set(model.projectors) == {"temporal"} and not hasattr(model, "no_face")
    with pytest.raises(ValueError, match="missing"):
        model(pixel_values=batch["pixel_values"])


def test_masked_faces_use_the_no_face_token(model):
    batch = random_batch(model)
    batch["face_mask"][:] = False
    shuffled = dict(batch, face_embeds=torch.randn_like(batch["face_embeds"]))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, model(**shuffled).logits)


def test_same_seed_same_model_same_scores(extractor):
    first, second = tiny_rater(extractor, seed=3), tiny_rater(extractor, seed=3)
    perturb_trainable(first)
    perturb_trainable(second)
    first.eval(), second.eval()
    batch = random_batch(first)
    assert first.predict(**batch) == second.predict(**batch)


def test_save_and_load_give_identical_scores(tmp_path, extractor):
    model = tiny_rater(extractor)
    perturb_trainable(model)
    model.eval()
    batch = random_batch(model)
    expected = model.predict(**batch)
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["adapter", "backbone", "fvq_rater.json",
                                                                       "heads.safetensors"]
    assert not list((tmp_path / "ckpt").rglob("*.bin")) and not list((tmp_path / "ckpt").rglob("*.pt"))
    loaded = FVQRater.from_pretrained(tmp_path / "ckpt", merge_lora=False)
    assert loaded.predict(**batch) == expected
    # Scoring merges LoRA into the base weights: the same function up to float rounding.
    merged = FVQRater.from_pretrained(tmp_path / "ckpt")
    assert not merged.has_lora and merged.trained_digest == loaded.trained_digest
    assert [r["score"] for r in merged.predict(**batch)] == pytest.approx([r["score"] for r in expected], abs=1e-3)
    with pytest.raises(CheckpointError, match="merged into its backbone.*merge_lora=False"):
        merged.save_pretrained(tmp_path / "lost")
    # Saving the loaded model refers to the base it came from instead of copying it.
    loaded.save_pretrained(tmp_path / "again")
    assert not (tmp_path / "again" / "backbone").exists()
    assert FVQRater.from_pretrained(tmp_path / "again", merge_lora=False).predict(**batch) == expected


def test_predict_composes_level_and_score_text(model, monkeypatch):
    model.eval()
    monkeypatch.setattr(model.config, "recipe", model.config.recipe.replace(mos_range=(0.0, 100.0)))
    result = model.predict(**random_batch(model, batch=1))[0]
    assert result["level"] in LEVELS and 0 <= result["score"] <= 100
    assert result["text"] == answer_text(result["level"], result["score"], model.config.recipe)
    assert result["level"] == LEVELS[min(int(round(result["score"], 2) // 20), 4)]  # the text never contradicts itself
    assert result["text"].startswith("The video quality is ") and abs(sum(result["level_probs"].values()) - 1) < 1e-5


def test_without_the_training_mos_range_the_level_word_is_the_lms_own(model, monkeypatch):
    assert model.config.recipe.level_bins == "min-max" and model.config.recipe.mos_range is None
    level_logits = torch.tensor([[0.0, 3.0, 0.0, 0.0, 0.0]])
    monkeypatch.setattr(model, "forward", lambda **_: FVQRaterOutput(None, level_logits, torch.tensor([93.0])))
    assert model.predict()[0]["level"] == "poor"


def test_level_bins_are_equal_width():
    assert level_index(torch.tensor([0.0, 19.9, 20.0, 59.9, 60.0, 80.0, 100.0])).tolist() == [0, 0, 1, 2, 3, 4, 4]
    # FineVQ's min-max bins, e.g. LIVE-VQC's MOS range 6.22..94.29: boundaries 23.84 / 41.45 / 59.06 / 76.67
    assert level_index(torch.tensor([6.22, 23.77, 24.11, 59.24, 76.72, 94.29]), (6.22368, 94.2865)).tolist() == [
        0, 0, 1, 3, 4, 4]


def test_lora_targets_follow_the_settings():
    assert "vision_tower" not in LoraSettings(vision=False).target_modules()
    assert "language_model" not in LoraSettings(llm=False).target_modules()


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not an FVQ-Rater checkpoint.*fvq-rater convert"):
        FVQRater.from_pretrained(tmp_path)


def test_config_rejects_unknown_streams_and_fields():
    with pytest.raises(ValueError, match="streams"):
        FVQRaterConfig(streams=("spatial", "audio"))
    with pytest.raises(CheckpointError, match="unknown"):
        FVQRaterConfig.from_dict({"streams": ["spatial"], "colour": "red"})


def test_a_bfloat16_backbone_works_with_float32_heads(tmp_path, extractor):
    model = tiny_rater(extractor)
    perturb_trainable(model)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = FVQRater.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert loaded.vlm.dtype == torch.bfloat16 and loaded.score_head.output.weight.dtype == torch.float32
    result = loaded.predict(**random_batch(loaded))
    assert len(result) == 2 and all(0 <= r["score"] <= 100 for r in result)


def test_the_level_word_names_the_bin_of_the_score_shown_and_the_level_head_is_reported_beside_it(model,
                                                                                                  monkeypatch):
    scores = torch.tensor([18.77, 19.999, 100.0, 0.0, 63.5])
    level_logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 5.0]]).expand(len(scores), -1)  # the head says "excellent"
    monkeypatch.setattr(model, "forward", lambda **_: FVQRaterOutput(None, level_logits, scores))
    monkeypatch.setattr(model.config, "recipe", model.config.recipe.replace(mos_range=(0.0, 100.0)))
    results = model.predict()
    assert [r["level"] for r in results] == ["bad", "poor", "excellent", "bad", "good"]  # 19.999 shows as 20.00
    assert results[0]["text"] == "The video quality is bad. The score is 18.77."
    assert all(max(r["level_probs"], key=r["level_probs"].get) == "excellent" for r in results)


@pytest.mark.reliability
def test_pickle_based_weights_are_refused_before_anything_is_unpickled(tmp_path, model, monkeypatch):
    import torch as torch_module

    model.save_pretrained(tmp_path / "ckpt")
    adapter = tmp_path / "ckpt" / "adapter"
    weights = next(adapter.glob("*.safetensors"))
    torch_module.save({"x": torch_module.zeros(1)}, adapter / "adapter_model.bin")
    weights.unlink()
    monkeypatch.setattr(torch_module, "load", lambda *a, **k: pytest.fail("a pickle was loaded"))
    with pytest.raises(CheckpointError, match="pickle-based weights \\(adapter_model.bin\\).*safetensors only"):
        FVQRater.from_pretrained(tmp_path / "ckpt")


def test_saving_draws_nothing_from_the_rng(tmp_path, extractor):
    """Training saves checkpoints between epochs: a save must not change the dropout draws that follow."""
    model = tiny_rater(extractor)
    torch.manual_seed(0)
    model.save_pretrained(tmp_path / "ckpt")
    after_save = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after_save, torch.rand(3))
