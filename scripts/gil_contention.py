"""How much a busy event loop slows the model's pass when both share one interpreter lock.

The model thread holds Python's lock while it dispatches each torch call and lets it go
while the call runs; any other thread of the daemon (the event loop, image preparation,
collation) that runs Python in between makes it wait. On a GPU, where a pass is bound by
dispatch rather than arithmetic, that wait is the pass's time. This times one pass over a
batch of verdicts alone, then while a second thread runs Python for a share of every
millisecond (`--duty`) and sleeps the rest, as an event loop does under load.

On a CPU it uses the architecture's depth and head count with widths cut to almost nothing
and one small image (dispatch-bound, as on a GPU; about a minute); `--full` builds the
full-size model, for a GPU:

    .venv/bin/python scripts/gil_contention.py --arch qwen2-vl-2b
    python scripts/gil_contention.py --full --device cuda --batch 16 --image-size 1920x1080
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

from daemon.bench_model import ARCHS, build_random_runner
from daemon.bench_pipeline import synthetic_jpegs
from daemon.config import ModelSettings
from daemon.images import Budget, load_for_model
from daemon.inference.runner import ModelRunner
from daemon.plugin_api import ChoiceQuery, ModelRequest

sys.path.insert(0, str(Path(__file__).parent))
from dispatch_count import narrow_runner


def busy_loop(stop: threading.Event, duty: float) -> None:
    """Run Python for `duty` of every millisecond, sleep the rest (the lock is free then)."""
    while not stop.is_set():
        until = time.perf_counter() + duty / 1000
        while time.perf_counter() < until:
            pass
        if duty < 1:
            time.sleep((1 - duty) / 1000)


def ms_per_pass(runner: ModelRunner, requests: list[ModelRequest], inputs: object, n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        runner.forward(requests, inputs)
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - started) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen2-vl-2b", choices=list(ARCHS))
    parser.add_argument("--full", action="store_true", help="full widths (for a GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--image-size", default="112x112")
    parser.add_argument("--passes", type=int, default=10)
    parser.add_argument("--duty", default="0.1,0.3,0.6", help="shares of each ms, comma-separated")
    parser.add_argument("--switch-ms", default="5,1", help="sys.setswitchinterval values, in ms")
    args = parser.parse_args()
    width, height = (int(side) for side in args.image_size.split("x"))
    if args.full:
        runner = build_random_runner(args.arch, args.device, args.dtype)
    else:
        torch.set_num_threads(1)  # one core for the pass, the other for the busy thread
        runner = narrow_runner(args.arch)
    budget = Budget(ModelSettings().image_max_pixels, runner.image_factor)
    image = load_for_model(synthetic_jpegs(1, (width, height), seed=1)[0], budget)
    query = ChoiceQuery("Is there fire? Answer yes or no.", {"yes": ["yes"], "no": ["no"]})
    requests = [ModelRequest(query, [image]) for _ in range(args.batch)]
    inputs = runner.collate(requests)
    runner.forward(requests, inputs)  # lazy initialisation
    alone = ms_per_pass(runner, requests, inputs, args.passes)
    print(
        f"{args.arch}{'' if args.full else ' (narrow)'}, {args.batch} verdicts on "
        f"{image.width}x{image.height}, {runner.device}: {alone:.1f} ms per pass alone",
        flush=True,
    )
    for switch_ms in (float(value) for value in args.switch_ms.split(",")):
        sys.setswitchinterval(switch_ms / 1000)
        for duty in (float(value) for value in args.duty.split(",")):
            stop = threading.Event()
            other = threading.Thread(target=busy_loop, args=(stop, duty), daemon=True)
            other.start()
            try:
                ms = ms_per_pass(runner, requests, inputs, args.passes)
            finally:
                stop.set()
                other.join()
            print(
                f"  other thread in Python {duty:4.0%} of the time, switch interval "
                f"{switch_ms:g} ms: {ms:8.1f} ms per pass ({ms / alone:.2f}x)",
                flush=True,
            )


if __name__ == "__main__":
    main()
