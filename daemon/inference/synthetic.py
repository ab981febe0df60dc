"""Tiny, randomly initialised Qwen2-VL-family models, built offline in seconds.

Saved in the file layout of a hub snapshot (config, safetensors weights, tokenizer,
preprocessor config, chat_template.json), so the real loading code reads them with
`from_pretrained`. The weights are random: answers are noise, compute paths are real.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
)
from transformers import (
    Qwen2_5_VLConfig as Qwen25VLConfig,
)

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: the chat template Qwen2-VL-Instruct snapshots ship (images, videos, text parts)
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = (
    "You are a helpful assistant.",
    "Is there a real open flame or smoke? Answer yes or no.",
    "Is the worker without a helmet? Answer yes or no.",
    "yes",
    "Yes",
    "no",
    "No",
    "yes Yes YES no No NO",
    ' yes Yes YES no No NO {"people": 3, "activity": "welding", "time_shown": "14:03"}',
    "true false null 0 1 2 3 4 5 6 7 8 9",
)

FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")


def build_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the Qwen special tokens, trained on a few lines."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(_CORPUS) * 50, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
    )


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    names = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in names.items()}


#: the tiny architectures: two layers, 64-wide hidden states. head_dim 16: the three M-RoPE
#: sections must sum to head_dim / 2.
_TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "mrope_section": [2, 3, 3],
}
#: Qwen2.5-VL and Qwen3-VL share the shape of their vision towers
_TINY_VISION = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 64,
}
TINY: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "qwen2-vl": (
        _TINY_TEXT,
        {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2},
    ),
    "qwen2.5-vl": (
        _TINY_TEXT,
        {**_TINY_VISION, "fullatt_block_indexes": [1], "window_size": 112},
    ),
    "qwen3-vl": (
        {**_TINY_TEXT, "head_dim": 16, "mrope_interleaved": True},
        {**_TINY_VISION, "num_position_embeddings": 64, "deepstack_visual_indexes": [0]},
    ),
}
_CONFIG_CLASSES = {
    "qwen2-vl": Qwen2VLConfig,
    "qwen2.5-vl": Qwen25VLConfig,
    "qwen3-vl": Qwen3VLConfig,
}


def config_for(
    family: str, tokenizer: PreTrainedTokenizerFast, *, text: dict[str, Any], vision: dict[str, Any]
) -> Any:
    """A config of `family` with these text and vision sizes, wired to the tokenizer's ids.

    `text` takes the text config's keys plus `mrope_section`, `mrope_interleaved`,
    `rope_theta` and `tie_word_embeddings`; `vocab_size` defaults to the tokenizer's.
    """
    if family not in _CONFIG_CLASSES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    text = dict(text)
    rope = {
        "rope_type": "default",
        "rope_theta": text.pop("rope_theta", 1e6),
        "mrope_section": text.pop("mrope_section"),
    }
    if text.pop("mrope_interleaved", False):
        rope["mrope_interleaved"] = True
    tie = text.pop("tie_word_embeddings", False)
    text_config = {
        "vocab_size": len(tokenizer),
        **text,
        "rope_parameters": rope,
        "bos_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if text_config["vocab_size"] < len(tokenizer):
        raise ValueError("the model's vocabulary is smaller than the tokenizer's")
    return _CONFIG_CLASSES[family](
        text_config=text_config,
        vision_config=dict(vision),
        tie_word_embeddings=tie,
        **_token_ids(tokenizer),
    )


def image_processor_for(family: str) -> Qwen2VLImageProcessorPil:
    if family == "qwen3-vl":
        return Qwen2VLImageProcessorPil(
            patch_size=16, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )
    return Qwen2VLImageProcessorPil()


def build_tiny_model(out_dir: Path, family: str = "qwen2-vl", seed: int = 0) -> Path:
    """Write a tiny random model of `family` to `out_dir` as a hub-style snapshot."""
    if family not in TINY:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    text, vision = TINY[family]
    return write_random_model(out_dir, family, text, vision, seed=seed)


def write_random_model(
    out_dir: Path,
    family: str,
    text: dict[str, Any],
    vision: dict[str, Any],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Path:
    """Write a random model of `family` with these sizes to `out_dir` as a hub-style
    snapshot (initialised on `device`: a full-size one is quicker on a GPU)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = config_for(family, tokenizer, text=text, vision=vision)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    image_processor_for(family).save_pretrained(out_dir)
    # hub snapshots keep the template at processor level, not in the tokenizer config
    (out_dir / "chat_template.json").write_text(
        json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}), encoding="utf-8"
    )
    return out_dir
