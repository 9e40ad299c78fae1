"""Tiny random InternVL backbones and a word-level tokenizer, built locally with no download.

They exercise exactly the code paths of the real InternVL2/2.5/3 models (same classes, same
config fields) at a size that trains on a CPU in minutes: tests, the demo and CPU benchmarks.
"""
from __future__ import annotations

import string

from transformers import InternVLConfig, InternVLVisionConfig, PreTrainedTokenizerFast, Qwen2Config

SPECIAL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                  "video_token": "<video>"}
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")  # InternLM2's, which the internlm2-chat template needs
_WORDS = ("how would you rate the overall quality of this video is bad poor fair good excellent score "
          "frame portrait face motion feature user assistant system").split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer whose vocabulary covers every word of the FVQ prompts."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    words = ["<unk>", "<pad>", "<s>", "</s>", *SPECIAL_TOKENS.values(), *CHAT_TOKENS, *dict.fromkeys(_WORDS),
             *string.digits, *string.punctuation, "\n"]
    vocab = {word: i for i, word in enumerate(dict.fromkeys(words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
                                                     pre_tokenizers.Digits(individual_digits=True)])
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", extra_special_tokens=dict(SPECIAL_TOKENS))
    tokenizer.add_special_tokens({"additional_special_tokens": list(CHAT_TOKENS)})
    return tokenizer


def tiny_backbone_config(tokenizer=None, image_size: int = 64, patch_size: int = 8, vision_width: int = 32,
                         text_width: int = 64, layers: int = 2) -> InternVLConfig:
    """An InternVL config with InternVL's real structure (pixel shuffle, MLP projector, Qwen2 LLM)."""
    tokenizer = tokenizer or tiny_tokenizer()
    vision = InternVLVisionConfig(hidden_size=vision_width, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=2 * vision_width, image_size=image_size, patch_size=patch_size)
    text = Qwen2Config(hidden_size=text_width, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=2 * text_width, vocab_size=len(tokenizer), max_position_embeddings=4096)
    tokens_per_image = (image_size // patch_size) ** 2 // 4
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.context_image_token_id,
                          image_seq_length=tokens_per_image, downsample_ratio=0.5, vision_feature_layer=-1,
                          vision_feature_select_strategy="default", projector_hidden_act="gelu",
                          # like the released InternVL2.5/3 checkpoints: a separate lm_head
                          tie_word_embeddings=False)


def tiny_rater(extractor, seed: int = 0, recipe=None, vision_tower=None, **config):
    """A tiny random FVQ-Rater matched to `extractor` (frames, sampling, image size, face width).

    Its recipe is `recipe` (default: fvq) with the frame count, frame sampling, temporal
    preprocessing and face embedding of the extractor's settings, under a name that says so.
    `vision_tower`: pretrained tower weights in place of random ones (FVQRater.random).
    """
    from .model import FVQRater, FVQRaterConfig
    from .recipe import FVQ

    features = extractor.config
    recipe = (recipe or FVQ).derive(num_frames=features.num_frames, frame_sampling=features.frame_sampling,
                                    temporal=features.temporal_preprocess, face_embedding=features.face_embedding)
    tokenizer = tiny_tokenizer()
    rater_config = FVQRaterConfig(face_dim=extractor.face_dim, recipe=recipe, features=features.to_dict(), **config)
    return FVQRater.random(rater_config, tiny_backbone_config(tokenizer, image_size=features.image_size),
                           tokenizer, seed=seed, vision_tower=vision_tower)
