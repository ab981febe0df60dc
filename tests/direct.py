"""The model called directly, without secondlook's code: the reference the tests compare to."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer


def png_b64(size: tuple[int, int]) -> tuple[str, Image.Image]:
    """A patterned PNG (base64) and the image itself."""
    image = Image.new("RGB", size)
    image.putdata(
        [
            ((x * 7) % 256, (y * 5) % 256, (x * y) % 256)
            for y in range(size[1])
            for x in range(size[0])
        ]
    )
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode(), image


def next_token_logits(
    model_dir: Path, prompt: str, image: Image.Image
) -> tuple[torch.Tensor, object]:
    """Logits after the prompt, from scratch: chat template, placeholder expansion, forward."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    template = json.loads((model_dir / "chat_template.json").read_text())["chat_template"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    vision = image_processor(images=[image], return_tensors="pt")
    n_tokens = int(vision["image_grid_thw"][0].prod()) // image_processor.merge_size**2
    text = text.replace("<|image_pad|>", "<|image_pad|>" * n_tokens)
    ids = tokenizer(text, return_tensors="pt")
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    with torch.no_grad():
        logits = model(
            **ids, **vision, mm_token_type_ids=(ids["input_ids"] == image_id).int()
        ).logits[0, -1]
    return logits, tokenizer


def label_probabilities(
    logits: torch.Tensor, tokenizer, choices: dict[str, Sequence[str]]
) -> dict[str, float]:
    """The documented rule, restated: per label, the forms that are one token and the first
    token of each form without a leading space (else all the forms' first tokens), minus
    tokens two labels share; log-sum-exp; softmax over labels."""
    ids: dict[str, set[int]] = {}
    for label, forms in choices.items():
        encoded = [tokenizer.encode(form, add_special_tokens=False) for form in forms]
        single = {tokens[0] for tokens in encoded if len(tokens) == 1}
        bare = {t[0] for f, t in zip(forms, encoded, strict=True) if not f.startswith(" ")}
        ids[label] = (single | bare) if single else {tokens[0] for tokens in encoded}
    shared = {t for label in ids for t in ids[label] if any(t in ids[o] for o in ids if o != label)}
    scores = torch.stack(
        [torch.logsumexp(logits[sorted(ids[label] - shared)], 0) for label in choices]
    )
    return dict(zip(choices, torch.softmax(scores, 0).tolist(), strict=True))
