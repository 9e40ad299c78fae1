"""Recipes: validated conventions, the prompt they render, and the read-out positions they state."""
import json

import pytest
import torch

from fvq_plugin.model import FVQRater, FVQRaterConfig, LoraSettings
from fvq_plugin.prompt import Prompt
from fvq_plugin.recipe import FINEVQ, FVQ, INTERNVL_SYSTEM_MESSAGE, RECIPES, Recipe, RecipeError, load_recipe
from fvq_plugin.tiny import tiny_backbone_config, tiny_tokenizer, tiny_rater
from test_model import perturb_trainable, random_batch


def test_recipes_round_trip_and_refuse_unknown_or_missing_fields(tmp_path):
    for recipe in RECIPES.values():
        assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    data = FVQ.to_dict()
    with pytest.raises(RecipeError, match=r"unknown recipe fields \['readout'\]"):
        Recipe.from_dict({**data, "readout": -4})
    # Fields added later have the value every recipe before them had: older files still load, unchanged.
    del data["mos_range"], data["face_embedding"]
    assert Recipe.from_dict(data) == FVQ
    del data["score_head"]
    with pytest.raises(RecipeError, match=r"missing recipe fields \['score_head'\]"):
        Recipe.from_dict(data)
    with pytest.raises(RecipeError, match="score_head is 'mlp9'.*relu-mlp5"):
        FVQ.replace(score_head="mlp9")
    with pytest.raises(RecipeError, match="answer must hold"):
        FVQ.replace(answer="Quality:{level}")
    with pytest.raises(RecipeError, match="unknown recipe 'qalign'"):
        load_recipe("qalign")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(FINEVQ.replace(name="mine", question="Rate it.").to_dict()))
    assert load_recipe(path=path).question == "Rate it."
    path.write_text("{not json")
    with pytest.raises(RecipeError, match="mine.json: cannot read a JSON recipe"):
        load_recipe(path=path)


def test_hand_written_recipe_values_have_their_types_checked():
    for changes, message in ((dict(bos="false"), "bos must be true/false"), (dict(num_frames=8.0), "num_frames must be"),
                             (dict(mos_range=[1]), "mos_range must be"), (dict(projectors=["temporal"]), "projectors"),
                             (dict(answer="The {x} is {level}."), "no other placeholder"),
                             (dict(face_embedding="unit"), "face_embedding is 'unit', expected one of l2, raw")):
        with pytest.raises(RecipeError, match=message):
            FVQ.replace(**changes)


def test_a_recipe_states_its_streams_and_the_rater_follows_them(extractor):
    assert FINEVQ.streams == ("spatial", "temporal") and FVQ.streams == ("spatial", "portrait", "face", "temporal")
    model = tiny_rater(extractor, recipe=FINEVQ)
    assert model.config.streams == ("spatial", "temporal") and set(model.projectors) == {"temporal"}


def test_unknown_feature_settings_are_an_error():
    from fvq_plugin.errors import InputError
    from fvq_plugin.features import FeatureConfig

    with pytest.raises(InputError, match=r"unknown feature settings \['face_modles'\]"):
        FeatureConfig.from_dict({"face_modles": "/models"})


def test_features_must_give_the_face_embedding_the_recipe_was_trained_on():
    from fvq_plugin.errors import InputError
    from fvq_plugin.features import FeatureConfig

    raw = FeatureConfig(face_embedding="raw")
    with pytest.raises(InputError, match="face_embedding is 'raw' where the recipe says 'l2'"):
        raw.check_recipe(FVQ, FVQ.streams)
    raw.check_recipe(FVQ.replace(face_embedding="raw"), FVQ.streams)
    raw.check_recipe(FINEVQ, FINEVQ.streams)  # no face stream


def test_the_demo_rater_reads_the_norm_of_the_face_embeddings_its_features_give():
    from fvq_plugin.demo import DEMO_FEATURES, DEMO_RECIPE

    assert DEMO_RECIPE.face_embedding == DEMO_FEATURES.face_embedding == "raw"
    assert DEMO_RECIPE.projectors["face"] == "mlp"  # a LayerNorm first would divide the norm away


def test_derived_recipes_say_what_changed():
    assert FVQ.derive(num_frames=8) is FVQ
    assert FVQ.derive(num_frames=4, temporal="kinetics").name == "fvq[num_frames=4,temporal=kinetics]"


def _prompt(recipe, tokenizer=None, streams=("spatial", "temporal"), tokens_per_frame=2):
    tokenizer = tokenizer or tiny_tokenizer()
    return Prompt(recipe.replace(num_frames=2), tokenizer, streams, tokens_per_frame,
                  tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))


def test_finevq_prompt_is_internvl_internlm2_chat_exactly():
    prompt = _prompt(FINEVQ)
    context = "<IMG_CONTEXT>"
    assert prompt.text == (
        f"<|im_start|>system\n{INTERNVL_SYSTEM_MESSAGE}<|im_end|><|im_start|>user\n"
        f"Frame1: <img>{context * 2}</img>\nFrame2: <img>{context * 2}</img>\nMotion Feature: <img>{context}</img>"
        "How would you rate the overall quality of this video?<|im_end|><|im_start|>assistant\n"
        "The overall quality of the video is")
    assert prompt.ids[0] == tiny_tokenizer().bos_token_id  # BOS, as InternLM2's tokenizer adds it
    assert [prompt.slot_count(s) for s in ("spatial", "temporal")] == [4, 1]
    assert prompt.continuation_ids is None


def test_fvq_prompt_continues_each_level_with_the_score_prompt():
    prompt = _prompt(FVQ, streams=("spatial", "portrait", "face", "temporal"))
    assert "Portrait2: <img>" in prompt.text and "Face: <img>" in prompt.text
    tokenizer = tiny_tokenizer()
    for level_id, continuation in zip(prompt.level_ids.tolist(), prompt.continuation_ids.tolist()):
        text = tokenizer.decode(continuation)
        assert continuation[0] == level_id and text.endswith("score is")


def test_a_tokenizer_without_the_templates_tokens_is_an_error_never_a_fallback():
    tokenizer = tiny_tokenizer()
    with pytest.raises(RecipeError, match="has none"):  # no chat template of its own
        _prompt(FVQ.replace(chat_template="tokenizer"), tokenizer)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from fvq_plugin.tiny import CHAT_TOKENS

    vocab = {word: i for i, word in enumerate(w for w in tokenizer.get_vocab() if w not in CHAT_TOKENS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    image_tokens = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", extra_special_tokens=image_tokens)
    with pytest.raises(RecipeError, match=r"<\|im_start\|> is not one token"):
        _prompt(FVQ, plain)
    unwrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>")
    with pytest.raises(RecipeError, match="names none"):
        _prompt(FVQ, unwrapped)


def test_a_prompt_whose_text_holds_an_image_token_is_refused():
    with pytest.raises(RecipeError, match="holds 6 image-context tokens where its slots need 5"):
        _prompt(FINEVQ.replace(question="<IMG_CONTEXT> rate it"))


@pytest.fixture(scope="module")
def trained_like(extractor):
    model = tiny_rater(extractor)
    perturb_trainable(model)
    return model.eval()


def test_score_after_the_score_prompt_uses_the_lms_level_and_matches_teacher_forcing(trained_like):
    batch = random_batch(trained_like, batch=3)
    with torch.no_grad():
        inferred = trained_like(**batch)
        chosen = inferred.level_logits.argmax(-1)
        forced = trained_like(**batch, levels=chosen)
        other = trained_like(**batch, levels=(chosen + 1) % 5)
    assert torch.allclose(inferred.score, forced.score, atol=1e-4)
    assert torch.allclose(inferred.level_logits, forced.level_logits, atol=1e-4)
    assert not torch.allclose(forced.score, other.score)  # the level word is really read


def test_finevq_score_is_read_at_index_minus_4_of_the_teacher_forced_answer(extractor):
    """FineVQ reads hidden_states[-1][:, -4] of "... is <level>.<|im_end|>": the token before the level word."""
    tokenizer = tiny_tokenizer()
    recipe = FINEVQ.derive(num_frames=extractor.config.num_frames, temporal="kinetics")
    model = FVQRater.random(FVQRaterConfig(streams=("spatial", "temporal"), recipe=recipe, lora=LoraSettings(r=0)),
                            tiny_backbone_config(tokenizer, image_size=extractor.config.image_size), tokenizer)
    perturb_trainable(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with torch.no_grad():
        model.score_head.fc1.weight.normal_(0, 0.5)
        model.score_head.fc5.bias.fill_(0.2)
    model.eval()
    batch = random_batch(model, batch=2)
    batch = {"pixel_values": batch["pixel_values"], "temporal": batch["temporal"]}
    with torch.no_grad():
        ours = model(**batch).score
        # The reference: FineVQ's own computation, with the whole answer in the sequence.
        vlm = model.vlm
        tokens = model._stream_tokens(**batch, portrait_values=None, face_embeds=None, face_mask=None)
        answer = tokenizer(" good.<|im_end|>", add_special_tokens=False).input_ids
        assert len(answer) == 3
        ids = torch.cat([model.prompt_ids, torch.tensor(answer)]).expand(2, -1)
        embeds = vlm.get_input_embeddings()(ids)
        stream_map = torch.cat([model.stream_map, torch.zeros(3, dtype=torch.long)])
        for index, stream in ((1, "spatial"), (4, "temporal")):
            embeds = embeds.masked_scatter((stream_map == index).expand(2, -1).unsqueeze(-1), tokens[stream])
        hidden = vlm.model.language_model(inputs_embeds=embeds).last_hidden_state[:, -4]
        head = model.score_head
        reference = head.fc1(hidden).relu()
        for layer in (head.fc2, head.fc3, head.fc4, head.fc5):
            reference = layer(reference).relu()
    assert torch.allclose(ours, reference.squeeze(-1) * 100, atol=1e-4)
    assert (ours > 0).all()


def test_spliced_tokens_must_fill_the_slots_exactly(trained_like):
    batch = random_batch(trained_like)
    batch["face_embeds"] = batch["face_embeds"][:, :-1]
    batch["face_mask"] = batch["face_mask"][:, :-1]
    with pytest.raises(ValueError, match="face: 3 tokens per video for 4 prompt slots"):
        trained_like(**batch)


def test_projector_and_head_structures_follow_the_recipe(extractor):
    model = tiny_rater(extractor)
    vit_width = model.vlm.config.vision_config.hidden_size * 4
    assert isinstance(model.projectors["temporal"][0], torch.nn.LayerNorm)
    assert model.projectors["portrait"][1].in_features == vit_width  # its own projector on pixel-shuffled ViT features
    assert [model.score_head.fc1.in_features, model.score_head.fc5.out_features] == [64, 1]
    other = tiny_rater(extractor, recipe=FVQ.replace(projectors={"portrait": "mlp", "face": "mlp", "temporal": "mlp"},
                                                     portrait_input="projected", score_head="gelu-mlp2"))
    assert isinstance(other.projectors["temporal"][0], torch.nn.Linear)
    assert other.projectors["portrait"][0].in_features == 64 and other.score_head.output.out_features == 1
    with torch.no_grad():
        assert other(**random_batch(other)).score.shape == (2,)


def test_streams_of_different_batch_sizes_are_refused(trained_like):
    batch = random_batch(trained_like, batch=2)
    batch["temporal"] = torch.cat([batch["temporal"], batch["temporal"][:1]])
    with pytest.raises(ValueError, match="temporal: 3 videos where spatial has 2"):
        trained_like(**batch)
    batch = random_batch(trained_like, batch=2)
    batch["face_mask"] = batch["face_mask"][:1]
    with pytest.raises(ValueError, match="face_mask \\(1, 4\\) does not match"):
        trained_like(**batch)
