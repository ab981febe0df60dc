"""Teach a tiny random model a few fixed answers, so end-to-end tests see meaningful output.

A few dozen optimiser steps on (prompt, image) -> answer, loss on the answer tokens only.
The result is still a real model read by the real loading code; it has simply memorised
what to say for these inputs.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from daemon.images import Budget, load_for_model
from daemon.inference.processors import load_processor


@dataclass(frozen=True)
class Lesson:
    prompt: str
    #: the snapshot as the alert carries it (JPEG or PNG bytes)
    snapshot: bytes
    answer: str


def teach(base: Path, out: Path, lessons: list[Lesson], steps: int = 30, seed: int = 0) -> Path:
    shutil.copytree(base, out, dirs_exist_ok=True)
    torch.manual_seed(seed)
    processor = load_processor(str(base))
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    batches = []
    for lesson in lessons:
        # exactly the pixels the daemon will show the model
        image = load_for_model(lesson.snapshot, Budget(448 * 448, 28))
        content = [{"type": "image"}, {"type": "text", "text": lesson.prompt}]
        messages = [{"role": "user", "content": content}]
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = processor(text=[prompt + lesson.answer + "<|im_end|>"], images=[image])
        prompt_len = processor(text=[prompt], images=[image])["input_ids"].shape[1]
        labels = full["input_ids"].clone()
        labels[:, :prompt_len] = -100
        batches.append({**full, "labels": labels})
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        for batch in batches:
            loss = model(**batch).loss
            loss.backward()
            optimiser.step()
            optimiser.zero_grad()
    model.eval()
    model.save_pretrained(out)
    return out
