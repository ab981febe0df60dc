"""Where one pass over a batch of verdicts spends its time, eager and compiled.

Times one pass (and the vision tower alone) on the eager model, prints torch's profiler
table of the operations that took the most device time over three passes, then builds the
model again with `[model] compile` (each block compiled, the warm-up's four passes) and
times the same pass. Full size on a GPU; `--narrow` for a quick run on a CPU (the
architecture's depth with widths cut to almost nothing):

    python scripts/profile_pass.py --device cuda --batch 16 --image-size 1920x1080
    .venv/bin/python scripts/profile_pass.py --narrow
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from daemon.bench_model import ARCHS, build_random_runner
from daemon.bench_pipeline import synthetic_jpegs
from daemon.config import ModelSettings
from daemon.images import Budget, load_for_model
from daemon.inference.runner import ModelRunner, prepare_for_inference
from daemon.plugin_api import ChoiceQuery, ModelRequest

sys.path.insert(0, str(Path(__file__).parent))
from dispatch_count import narrow_runner


def ms_per_call(fn: Callable[[], object], device: torch.device, n: int) -> float:
    fn()  # lazy initialisation, kernel selection
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(n):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - started) / n


def measure(label: str, runner: ModelRunner, requests: list[ModelRequest], n: int) -> None:
    inputs = runner.collate(requests)
    visual = getattr(runner.model, "model", runner.model).visual
    pixels = inputs["pixel_values"].to(runner.device)
    grid = inputs["image_grid_thw"].to(runner.device)

    @torch.inference_mode()
    def vision() -> None:
        visual(pixels, grid_thw=grid)

    whole = ms_per_call(lambda: runner.forward(requests, inputs), runner.device, n)
    tower = ms_per_call(vision, runner.device, n)
    print(f"{label}: {whole:.1f} ms per pass, vision tower {tower:.1f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen2-vl-2b", choices=list(ARCHS))
    parser.add_argument("--narrow", action="store_true", help="narrow widths (for a CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", default="1920x1080")
    parser.add_argument("--passes", type=int, default=10)
    args = parser.parse_args()
    if args.narrow:
        runner = narrow_runner(args.arch)
        args.batch, args.image_size, args.passes = 2, "112x112", 2
    else:
        runner = build_random_runner(args.arch, args.device, args.dtype)
    width, height = (int(side) for side in args.image_size.split("x"))
    budget = Budget(ModelSettings().image_max_pixels, runner.image_factor)
    image = load_for_model(synthetic_jpegs(1, (width, height), seed=1)[0], budget)
    query = ChoiceQuery("Is there fire? Answer yes or no.", {"yes": ["yes"], "no": ["no"]})
    requests = [ModelRequest(query, [image]) for _ in range(args.batch)]
    print(f"{args.arch}, {args.batch} verdicts on {image.width}x{image.height}", flush=True)
    measure("eager", runner, requests, args.passes)
    if runner.device.type == "cuda":
        inputs = runner.collate(requests)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                runner.forward(requests, inputs)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
        print(f"three passes:\n{table}", flush=True)
    started = time.perf_counter()
    if args.narrow:  # the same narrow model, compiled now
        prepare_for_inference(runner.model, compile=True)
        runner.compiled = True
    else:
        del runner
        runner = build_random_runner(args.arch, args.device, args.dtype, compile=True)
    runner.warm_up()
    print(f"compiled and warmed up in {time.perf_counter() - started:.1f} s", flush=True)
    measure("compiled", runner, requests, args.passes)


if __name__ == "__main__":
    main()
