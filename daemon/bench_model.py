"""`secondlook bench`: secondlook's model path against the naive one, in one process.

The naive baseline is what tutorials do: one alert at a time, the whole snapshot at the
processor's default resolution (a hub snapshot allows up to 12.8 megapixels: a 1280x720
frame becomes about 1,200 visual tokens), `generate(max_new_tokens=64)`, then look for "yes"
in the text. secondlook's path uses its defaults: a JPEG draft decode to the 448x448 token
budget, micro-batching, and one forward pass per verdict.

The model is either a full-size architecture with random weights (`--arch`: the same compute
as the real model, no download) or a snapshot directory (`--model`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import io
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, Qwen2VLImageProcessorPil

from daemon.bench_pipeline import synthetic_jpegs
from daemon.config import ModelSettings, PipelineSettings
from daemon.images import Budget, decode, load_for_model
from daemon.inference.batcher import MicroBatcher
from daemon.inference.compiling import eager
from daemon.inference.processors import ImageOnlyProcessor
from daemon.inference.runner import (
    ModelRunner,
    pick_attention,
    pick_device,
    pick_dtype,
    prepare_for_inference,
)
from daemon.inference.synthetic import (
    QWEN2_VL_CHAT_TEMPLATE,
    build_tokenizer,
    config_for,
    image_processor_for,
    write_random_model,
)
from daemon.inference.vision_attention import stock_vision_attention
from daemon.plugin_api import ChoiceQuery, ModelRequest
from plugins.verdict import NO_FORMS, YES_FORMS

PROMPT = (
    "This snapshot comes from a factory safety camera whose detector reported open fire. "
    "Is there a real open flame or smoke in the picture, not a lamp, a reflection or "
    "sunlight? Answer yes or no."
)
BASELINE_NEW_TOKENS = 64
#: alerts sent one after another for secondlook's latency at light load
LIGHT_LOAD_ALERTS = 16
#: the hub snapshots' preprocessor settings (preprocessor_config.json of Qwen2-VL-Instruct)
HUB_MIN_PIXELS = 3136
HUB_MAX_PIXELS = 12845056

#: full-size architectures (their hub config.json, abridged): family, text, vision
ARCHS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "qwen2-vl-2b": (
        "qwen2-vl",
        {
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "vocab_size": 151936,
            "tie_word_embeddings": True,
            "mrope_section": [16, 24, 24],
            "rope_theta": 1e6,
        },
        {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4},
    ),
    "qwen2-vl-7b": (
        "qwen2-vl",
        {
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
            "tie_word_embeddings": False,
            "mrope_section": [16, 24, 24],
            "rope_theta": 1e6,
        },
        {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "num_heads": 16, "mlp_ratio": 4},
    ),
    "qwen2.5-vl-3b": (
        "qwen2.5-vl",
        {
            "hidden_size": 2048,
            "intermediate_size": 11008,
            "num_hidden_layers": 36,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "vocab_size": 151936,
            "tie_word_embeddings": True,
            "mrope_section": [16, 24, 24],
            "rope_theta": 1e6,
        },
        {
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 2048,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
    ),
    "qwen2.5-vl-7b": (
        "qwen2.5-vl",
        {
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
            "tie_word_embeddings": False,
            "mrope_section": [16, 24, 24],
            "rope_theta": 1e6,
        },
        {
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 3584,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
    ),
    "qwen3-vl-2b": (
        "qwen3-vl",
        {
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 151936,
            "tie_word_embeddings": True,
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
            "rope_theta": 5e6,
        },
        {
            "depth": 24,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_heads": 16,
            "out_hidden_size": 2048,
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [5, 11, 17],
        },
    ),
}


@dataclass
class Side:
    """One side's figures."""

    latencies_s: list[float]
    elapsed_s: float
    peak_rss_mb: float
    peak_gpu_mb: float | None
    visual_tokens: int
    #: the batcher's figures (secondlook's side)
    batching: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        def pct(p: float) -> float:
            ordered = sorted(self.latencies_s)
            return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] * 1000

        return {
            "alerts": len(self.latencies_s),
            "alerts_per_s": round(len(self.latencies_s) / self.elapsed_s, 4),
            "p50_ms": round(statistics.median(self.latencies_s) * 1000, 1),
            "p95_ms": round(pct(95), 1),
            "p99_ms": round(pct(99), 1),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "peak_gpu_mb": None if self.peak_gpu_mb is None else round(self.peak_gpu_mb, 1),
            "visual_tokens": self.visual_tokens,
            **self.batching,
        }


def _rss_mb() -> float:
    with Path("/proc/self/status").open(encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _give_back_freed() -> None:
    """Return what earlier work freed to the system (the C allocator keeps freed pages), so
    that a side's peak is not the one before it's left-overs."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float | None]]:
    """Sample the process's resident memory every 20 ms (and the GPU's peak allocation),
    from what it is once freed memory is given back."""
    _give_back_freed()
    result: dict[str, float | None] = {"rss": _rss_mb(), "gpu": None}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            result["rss"] = max(result["rss"] or 0.0, _rss_mb())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        if device.type == "cuda":
            result["gpu"] = torch.cuda.max_memory_allocated(device) / 2**20


def write_random_snapshot(arch: str, out_dir: Path, device: str, dtype: str) -> Path:
    """A full-size model of `arch` with random weights, saved as a hub-style snapshot (for
    what loads a model from a directory: the daemon)."""
    family, text, vision = ARCHS[arch]
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    return write_random_model(
        out_dir, family, text, vision, dtype=torch_dtype, device=str(torch_device)
    )


def build_random_runner(arch: str, device: str, dtype: str, compile: bool = False) -> ModelRunner:
    """A full-size model of `arch` with random weights, and a processor for it."""
    family, text, vision = ARCHS[arch]
    tokenizer = build_tokenizer(vocab_size=4000)
    config = config_for(family, tokenizer, text=text, vision=vision)
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    torch.manual_seed(0)
    attention = pick_attention("auto", torch_device, torch_dtype)  # as the daemon picks it
    with torch_device:  # random initialisation on the target device: seconds, not minutes
        model = AutoModelForImageTextToText.from_config(
            config, dtype=torch_dtype, attn_implementation=attention
        )
    prepare_for_inference(model, compile)
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    processor = ImageOnlyProcessor(tokenizer, image_processor_for(family), QWEN2_VL_CHAT_TEMPLATE)
    return ModelRunner(
        model, processor, torch_device, max_new_tokens=BASELINE_NEW_TOKENS, compiled=compile
    )


def visual_tokens(runner: ModelRunner, size: tuple[int, int], image_processor: Any) -> int:
    patches = image_processor.get_number_of_image_patches(size[1], size[0], {})
    return int(patches) // image_processor.merge_size**2


def run_baseline(
    runner: ModelRunner,
    jpegs: list[bytes],
    tick: Callable[[], None],
    max_new_tokens: int = BASELINE_NEW_TOKENS,
) -> tuple[Side, float, float]:
    """One at a time, full resolution, generate then parse, after one alert untimed (as
    secondlook's path is warmed up before). Returns the side, the share of answers containing
    "yes" (random weights answer noise) and the mean number of tokens generated (random
    weights seldom end an answer early: a trained model answering "Yes." stops at 2-3)."""
    hub = Qwen2VLImageProcessorPil(
        min_pixels=HUB_MIN_PIXELS,
        max_pixels=HUB_MAX_PIXELS,
        patch_size=runner.processor.image_processor.patch_size,
        image_mean=runner.processor.image_processor.image_mean,
        image_std=runner.processor.image_processor.image_std,
    )
    processor = ImageOnlyProcessor(runner.tokenizer, hub, runner.processor.chat_template)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    latencies, yes, generated = [], 0, 0

    def answer(jpeg: bytes, new_tokens: int) -> str:
        nonlocal generated
        inputs = processor(text=[text], images=[decode(jpeg)]).to(runner.device)
        with torch.inference_mode():
            output = runner.model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=runner.tokenizer.pad_token_id,
            )
        prompt_tokens = inputs["input_ids"].shape[1]
        generated += output.shape[1] - prompt_tokens
        return str(runner.tokenizer.decode(output[0, prompt_tokens:]))

    with stock_vision_attention(runner.model), eager():
        answer(jpegs[0], 2)  # untimed: the kernels of the stock path, loaded and tuned
        generated = 0
        with peak_memory(runner.device) as peak:
            start = time.perf_counter()
            for jpeg in jpegs:
                began = time.perf_counter()
                yes += "yes" in answer(jpeg, max_new_tokens).lower()
                latencies.append(time.perf_counter() - began)
                tick()
            elapsed = time.perf_counter() - start
    size = decode(jpegs[0]).size
    side = Side(
        latencies, elapsed, peak["rss"] or 0.0, peak["gpu"], visual_tokens(runner, size, hub)
    )
    return side, yes / len(jpegs), generated / len(jpegs)


async def run_secondlook(
    runner: ModelRunner,
    jpegs: list[bytes],
    settings: ModelSettings,
    tick: Callable[[], None],
    one_at_a_time: bool = False,
) -> Side:
    """The daemon's own preparation and batcher: all alerts at once (throughput), or each
    after the previous one's verdict (latency at light load)."""
    budget = Budget(settings.image_max_pixels, runner.image_factor)
    query = ChoiceQuery(PROMPT, {"yes": YES_FORMS, "no": NO_FORMS})
    loop = asyncio.get_running_loop()
    with (
        ThreadPoolExecutor(1, "model") as model_pool,
        ThreadPoolExecutor(os.cpu_count(), "prepare") as prep_pool,
        peak_memory(runner.device) as peak,
    ):
        batcher = MicroBatcher(
            runner,
            max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_ms / 1000,
            model_pool=model_pool,
            prep_pool=prep_pool,
        )
        batching = asyncio.create_task(batcher.run())

        # as many alerts under review at once as the daemon takes ([pipeline] workers): the
        # rest wait their turn as they would in its queue, not as decoded images
        reviewing = asyncio.Semaphore(PipelineSettings().workers)

        async def one(jpeg: bytes) -> float:
            async with reviewing:
                began = time.perf_counter()
                image = await loop.run_in_executor(prep_pool, load_for_model, jpeg, budget)
                await batcher.submit(ModelRequest(query, [image]))
                tick()
                return time.perf_counter() - began

        start = time.perf_counter()
        if one_at_a_time:
            latencies = [await one(jpeg) for jpeg in jpegs]
        else:
            latencies = await asyncio.gather(*(one(jpeg) for jpeg in jpegs))
        elapsed = time.perf_counter() - start
        batching.cancel()
    size = load_for_model(jpegs[0], budget).size
    tokens = visual_tokens(runner, size, runner.processor.image_processor)
    report = batcher.report()
    figures = {
        "batches": report["batches"],
        "mean_batch": round(report["requests"] / max(1, report["batches"]), 2),
        # the rest of the time the model waited for images or for a collated batch
        "model_busy_pct": round(100 * report["busy_s"] / elapsed, 1),
    }
    return Side(list(latencies), elapsed, peak["rss"] or 0.0, peak["gpu"], tokens, figures)


def describe_snapshot(jpeg: bytes) -> str:
    with Image.open(io.BytesIO(jpeg)) as image:
        return f"{image.width}x{image.height} JPEG, {len(jpeg) // 1024} KB"


def model_from(path: Path | None, arch: str | None, settings: ModelSettings) -> ModelRunner:
    if path is not None:
        return ModelRunner.load(settings.model_copy(update={"path": str(path)}))
    if arch is None or arch not in ARCHS:
        raise ValueError(f"--arch must be one of {', '.join(ARCHS)}")
    return build_random_runner(arch, settings.device, settings.dtype, settings.compile)


def run_model_bench(
    runner: ModelRunner,
    alerts: int,
    image_size: tuple[int, int],
    settings: ModelSettings,
    progress: Callable[[str, int], Callable[[], None]],
    baseline_alerts: int | None = None,
    baseline_new_tokens: int = BASELINE_NEW_TOKENS,
) -> dict[str, Any]:
    """Both sides on the same snapshots (the baseline on the first `baseline_alerts` of
    them, all by default), then secondlook one alert at a time for its latency at light
    load; `progress(name, total)` returns a tick function."""
    jpegs = synthetic_jpegs(alerts, image_size, seed=1)
    runner.warm_up()
    naive = jpegs[: baseline_alerts or alerts]
    baseline, yes_share, new_tokens = run_baseline(
        runner, naive, progress("baseline", len(naive)), baseline_new_tokens
    )
    ours = asyncio.run(run_secondlook(runner, jpegs, settings, progress("secondlook", alerts)))
    light = jpegs[:LIGHT_LOAD_ALERTS]
    alone = asyncio.run(
        run_secondlook(runner, light, settings, progress("light load", len(light)), True)
    )
    result = {
        "snapshot": describe_snapshot(jpegs[0]),
        "device": str(runner.device),
        "baseline": {
            **baseline.summary(),
            "max_new_tokens": baseline_new_tokens,
            "new_tokens": round(new_tokens, 1),  # generated per alert, on average
            "answers_with_yes": yes_share,
        },
        "secondlook": {
            **ours.summary(),
            "max_batch": settings.max_batch,
            "max_wait_ms": settings.max_wait_ms,
        },
        "light_load": {
            key: value
            for key, value in alone.summary().items()
            if key in ("alerts", "p50_ms", "p95_ms", "p99_ms")
        },
    }
    result["speedup"] = round(
        result["secondlook"]["alerts_per_s"] / result["baseline"]["alerts_per_s"], 2
    )
    return result
