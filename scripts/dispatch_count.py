"""What one verdict batch asks of the host: torch calls dispatched and device read-backs.

On a GPU, eager PyTorch pays host time for every call and stalls at every read-back
(`.item()`, `.tolist()`, truth tests). This counts both for one pass over a batch of verdict
queries, at a full-size architecture's depth and head count with widths cut to almost
nothing (the counts do not depend on widths), with the vision tower on transformers' own
SDPA path and on secondlook's grouped one. Runs on a CPU in about a minute:

    .venv/bin/python scripts/dispatch_count.py --arch qwen2-vl-2b --batch 16
"""

from __future__ import annotations

import argparse
import collections
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForImageTextToText

from daemon.bench_model import ARCHS
from daemon.bench_pipeline import synthetic_jpegs
from daemon.config import ModelSettings
from daemon.images import Budget, load_for_model
from daemon.inference.processors import ImageOnlyProcessor
from daemon.inference.runner import ModelRunner, prepare_for_inference
from daemon.inference.synthetic import (
    QWEN2_VL_CHAT_TEMPLATE,
    build_tokenizer,
    config_for,
    image_processor_for,
)
from daemon.inference.vision_attention import stock_vision_attention
from daemon.plugin_api import ChoiceQuery, ModelRequest

READ_BACKS = {"item", "tolist", "__bool__", "__int__", "__index__", "__len__", "nonzero"}
NARROW = {"hidden_size", "embed_dim", "intermediate_size", "out_hidden_size"}


class CountCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        self.calls[getattr(func, "__name__", str(func))] += 1
        return func(*args, **(kwargs or {}))


def narrow_runner(arch: str) -> ModelRunner:
    """`arch` at its depth and head counts, 16 wide per head at most: cheap on a CPU."""
    family, text, vision = ARCHS[arch]
    text = {**text, "vocab_size": 4096, "head_dim": 16}
    text["hidden_size"] = text["intermediate_size"] = 16 * text["num_attention_heads"]
    text["mrope_section"] = [2, 3, 3]
    vision = {key: 4 * vision["num_heads"] if key in NARROW else v for key, v in vision.items()}
    if "hidden_size" in vision and "embed_dim" in vision:  # Qwen2-VL: hidden = text width
        vision["hidden_size"] = text["hidden_size"]
    if "out_hidden_size" in vision:
        vision["out_hidden_size"] = text["hidden_size"]
    tokenizer = build_tokenizer(vocab_size=4000)
    model = AutoModelForImageTextToText.from_config(
        config_for(family, tokenizer, text=text, vision=vision)
    )
    prepare_for_inference(model, compile=False)
    processor = ImageOnlyProcessor(tokenizer, image_processor_for(family), QWEN2_VL_CHAT_TEMPLATE)
    return ModelRunner(model, processor, torch.device("cpu"), max_new_tokens=8)


def count(runner: ModelRunner, requests: list[ModelRequest], inputs: Any) -> dict[str, int]:
    runner.forward(requests, inputs)  # first pass: lazy initialisation
    with CountCalls() as counter:
        runner.forward(requests, inputs)
    read_backs = sum(n for name, n in counter.calls.items() if name in READ_BACKS)
    return {"torch_calls": sum(counter.calls.values()), "read_backs": read_backs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen2-vl-2b", choices=list(ARCHS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", default="1920x1080")
    args = parser.parse_args()
    width, height = (int(side) for side in args.image_size.split("x"))
    runner = narrow_runner(args.arch)
    budget = Budget(ModelSettings().image_max_pixels, runner.image_factor)
    image = load_for_model(synthetic_jpegs(1, (width, height), seed=1)[0], budget)
    query = ChoiceQuery("Is there fire? Answer yes or no.", {"yes": ["yes"], "no": ["no"]})
    requests = [ModelRequest(query, [image]) for _ in range(args.batch)]
    grouped = count(runner, requests, runner.collate(requests))
    with stock_vision_attention(runner.model):
        inputs = runner.collate(requests)
        inputs.pop("position_ids", None)  # the model computes them in its pass
        stock = count(runner, requests, inputs)
    print(f"{args.arch}, {args.batch} verdicts on {image.width}x{image.height} images:")
    for name, counts in (("transformers' own path", stock), ("secondlook's path", grouped)):
        calls, reads = counts["torch_calls"], counts["read_backs"]
        print(f"  {name:23s} {calls:6,} torch calls, {reads:3} device read-backs")


if __name__ == "__main__":
    main()
