"""A tiny random Qwen2-VL checkpoint for lmms-eval's own ``qwen2_vl`` model class (CPU, offline).

tests/test_lmms_eval.py runs it on ``fvq20k_generic`` to show that any lmms-eval model runs our task.

``build_tiny_checkpoint(out_dir)`` writes, into ``out_dir``:
  * config.json / generation_config.json / model.safetensors: a Qwen2VLForConditionalGeneration with a
    1-layer, hidden-32 Qwen2 text model and a 1-block, 32-dim vision tower, random float32 weights (~0.3 MB);
  * tokenizer.json / tokenizer_config.json: a character-level tokenizer built locally with `tokenizers`
    (printable ASCII + newline, `<unk>` for anything else) plus the Qwen2-VL special tokens;
  * chat_template.jinja and processor_config.json: a minimal Qwen-style chat template that renders
    image/video content items as ``<|vision_start|><|image_pad|/<|video_pad|><|vision_end|>``, and the
    Qwen2VL processor (image + video processor) configs.

Load it with ``--model qwen2_vl --model_args pretrained=<out_dir>,device=cpu,device_map=cpu``. The weights are
random, so generations are nonsense strings, but they depend on the video (initializer_range=0.2).
"""

import os

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_checkpoint(out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)

    vocab = {tok: i for i, tok in enumerate(SPECIALS + [chr(c) for c in range(32, 127)] + ["\n"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<unk>", chat_template=CHAT_TEMPLATE)

    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         initializer_range=0.2, bos_token_id=None, eos_token_id=vocab["<|im_end|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, initializer_range=0.2),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
    )
    Qwen2VLForConditionalGeneration(config).eval().save_pretrained(out_dir)

    pixels = dict(min_pixels=56 * 56, max_pixels=112 * 112)  # lmms-eval overrides these at load time anyway
    Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels, cap_pixels_per_frame=True),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(out_dir)
    return out_dir

