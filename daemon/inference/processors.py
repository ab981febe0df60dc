"""The model's processor for still images: tokenizer, chat template and image patches.

Qwen2-VL-family processors also build a video processor, which needs torchvision; alerts
carry still images only, so secondlook wires the tokenizer and the snapshot's image
processor itself, the way the Qwen processors do (each image placeholder is expanded to one
token per merged patch), on every machine alike. Images already at a patch-aligned size (all
that secondlook prepares) are patched directly (daemon.inference.patches).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature
from transformers.utils import cached_file

from daemon.inference.patches import can_patch_directly, patch_images

IMAGE_TOKEN = "<|image_pad|>"


class ImageOnlyProcessor:
    """Tokenizer + image processor with the call signature of a Qwen2-VL processor."""

    def __init__(self, tokenizer: Any, image_processor: Any, chat_template: str) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        #: dtype of directly patched pixel values; the runner sets the model's (the vision
        #: tower casts to it anyway), so half as many bytes cross to the GPU
        self.pixel_dtype = torch.float32
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"the tokenizer has no {self.image_token} token (tokenizer.json missing, or "
                "not a Qwen-VL model's tokenizer)"
            )

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> ImageOnlyProcessor:
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", **kwargs)
        image_processor = AutoImageProcessor.from_pretrained(path, **kwargs)
        # the tokenizer's template where it places images, else the processor's own (as
        # transformers' processors prefer it): a tokenizer's may be a text-only one
        template = tokenizer.chat_template
        if not template or "image" not in template:
            template = read_chat_template(path, **kwargs) or template
        if not template:
            raise ValueError(f"{path} has no chat template")
        return cls(tokenizer, image_processor, template)

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, **kwargs
        )

    def __call__(
        self,
        *,
        text: list[str],
        images: list[Any] | None = None,
        padding: bool = True,
        return_tensors: str = "pt",
    ) -> BatchFeature:
        vision: dict[str, Any] = {}
        if images:
            vision = self._vision(images, return_tensors)
            merge = self.image_processor.merge_size**2
            counts = [int(grid.prod()) // merge for grid in vision["image_grid_thw"]]
            text = self._expand_placeholders(text, counts)
        encoded = self.tokenizer(text, padding=padding, return_tensors=return_tensors)
        ids = encoded["input_ids"]
        encoded["mm_token_type_ids"] = (ids == self.image_token_id).to(torch.int32)
        return BatchFeature({**encoded, **vision})

    def _vision(self, images: list[Any], return_tensors: str) -> dict[str, Any]:
        """Pixel values and grids: images that fit as they are patched directly, others by
        the image processor, each image on its own way (one odd image, say a strip the
        processor refuses, must not send its batch-mates to the processor too), in order."""
        processor = self.image_processor
        direct = [can_patch_directly([image], processor) for image in images]
        if all(direct):
            return patch_images(images, processor, self.pixel_dtype)
        if not any(direct):
            return dict(processor(images=images, return_tensors=return_tensors))
        parts = [
            patch_images([image], processor, self.pixel_dtype)
            if fits
            else dict(processor(images=[image], return_tensors=return_tensors))
            for image, fits in zip(images, direct, strict=True)
        ]
        return {
            "pixel_values": torch.cat([p["pixel_values"].to(self.pixel_dtype) for p in parts]),
            "image_grid_thw": torch.cat([p["image_grid_thw"] for p in parts]),
        }

    def _expand_placeholders(self, texts: list[str], counts: list[int]) -> list[str]:
        remaining = iter(counts)
        expanded = []
        for text in texts:
            parts = text.split(self.image_token)
            out = parts[0]
            for part in parts[1:]:
                n = next(remaining, None)
                if n is None:
                    raise ValueError("more image placeholders in the text than images")
                out += self.image_token * n + part
            expanded.append(out)
        if next(remaining, None) is not None:
            raise ValueError("more images than image placeholders in the text")
        return expanded


def read_chat_template(path: str, **kwargs: Any) -> str | None:
    """The processor-level chat template of a snapshot (chat_template.jinja or .json)."""
    for name in ("chat_template.jinja", "chat_template.json"):
        found = cached_file(  # offline, and not cached: the tokenizer's template serves
            path,
            name,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **kwargs,
        )
        if found is None:
            continue
        text = Path(found).read_text(encoding="utf-8")
        return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


def load_processor(path: str, **kwargs: Any) -> ImageOnlyProcessor:
    """The still-image processor of a snapshot (a hub id or a local directory)."""
    return ImageOnlyProcessor.from_pretrained(path, **kwargs)
