"""Micro-batching on the real model: batched equals alone; out-of-memory splits and falls back."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

from daemon.config import ModelSettings
from daemon.hookspecs import hookimpl
from daemon.inference.batch_limit import PROBE_AFTER, BatchLimit, SplitOutcome
from daemon.inference.batcher import MicroBatcher, _Waiting
from daemon.inference.compiling import compile_repeated_blocks
from daemon.inference.runner import ModelRunner
from daemon.inference.transformers_backend import TransformersBackend
from daemon.plugin_api import (
    BackendUnusable,
    ChoiceAnswer,
    ChoiceQuery,
    GenerateQuery,
    ModelRequest,
)
from plugins.verdict import NO_FORMS, YES_FORMS
from tests.conftest import FIRE_RULE, make_alert, make_settings, run_daemon

YES_NO = {"yes": YES_FORMS, "no": NO_FORMS}


def mixed_requests() -> list[ModelRequest]:
    """Choice and generate queries, prompts of different lengths, images of different sizes."""
    sizes = [(224, 224), (448, 224), (336, 168), (168, 336), (280, 280), (56, 112)]
    choice = [
        ModelRequest(
            ChoiceQuery("Is there fire? " + "Answer yes or no. " * (i % 3), YES_NO),
            [Image.new("RGB", size, (40 * i, 200 - 30 * i, 90))],
        )
        for i, size in enumerate(sizes)
    ]
    # answers of different lengths: a rule's own limit, and the configured one (None)
    generate = [
        ModelRequest(
            GenerateQuery("Count the people." + " Be brief." * i, limit),
            [Image.new("RGB", (224, 112), (i * 60, 10, 10))],
        )
        for i, limit in enumerate([6, 3, None])
    ]
    return [choice[0], generate[0], *choice[1:4], generate[1], *choice[4:], generate[2]]


def assert_same(together, alone) -> None:
    if isinstance(alone, ChoiceAnswer):
        for label in alone.probabilities:
            assert together.probabilities[label] == pytest.approx(
                alone.probabilities[label], abs=1e-4
            )
    else:
        assert together.text == alone.text


async def test_batched_answers_equal_answers_alone(tiny_model):
    settings = ModelSettings(path=str(tiny_model), max_batch=8, max_wait_ms=300, max_new_tokens=9)
    backend = TransformersBackend(settings)
    await backend.start()
    try:
        requests = mixed_requests()
        together = await asyncio.gather(*(backend.run(request) for request in requests))
        health = backend.health()
    finally:
        await backend.close()
    runner = ModelRunner.load(settings)
    for request, answer in zip(requests, together, strict=True):
        assert_same(answer, runner.run(request))
    # 6 choice queries in one pass, 3 generate queries in another
    assert health["batches"] == 2 and health["largest_batch"] == 6 and health["requests"] == 9
    assert health["busy_s"] > 0 and health["busy_for_s"] == 0.0


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_compiled_model_answers_as_the_eager_one_and_compiles_nothing_after_its_warm_up(
    tiny_model, attention
):
    settings = ModelSettings(path=str(tiny_model), max_new_tokens=9, attn_implementation=attention)
    requests = mixed_requests()
    choice = [r for r in requests if isinstance(r.query, ChoiceQuery)]
    generate = [r for r in requests if isinstance(r.query, GenerateQuery)]
    two_images = ModelRequest(choice[0].query, choice[0].images + choice[3].images)
    # of one request, mixed image sizes and prompt lengths, two requests of one size, three
    # images in two requests, text
    batches = [
        choice[1:2],
        choice,
        choice[2:4],
        [choice[0], choice[0]],
        [two_images, choice[5]],
        generate,
    ]
    plain = ModelRunner.load(settings)
    expected = [plain.run_batch(batch) for batch in batches]
    compiled = ModelRunner.load(settings.model_copy(update={"compile": True}))
    assert compiled.compiled
    before = counters["stats"]["unique_graphs"]
    compiled.warm_up()
    warmed = counters["stats"]["unique_graphs"]
    with torch.compiler.set_stance("fail_on_recompile"):  # nor would run uncompiled
        answers = [compiled.run_batch(batch) for batch in batches]
    assert warmed > before  # the warm-up compiled
    assert counters["stats"]["unique_graphs"] == warmed  # and nothing after it did
    for got, want in zip(answers, expected, strict=True):
        for together, alone in zip(got, want, strict=True):
            assert_same(together, alone)


def test_each_block_of_a_models_stacks_is_compiled_and_a_model_without_stacks_whole():
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.parts = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block() for _ in range(3)])
            self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)])
            self.mixed = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.ReLU()])

    def compiled(module: torch.nn.Module) -> bool:
        return module._compiled_call_impl is not None

    model = Model()
    assert compile_repeated_blocks(model) == 5
    assert all(compiled(block) for block in [*model.blocks, *model.layers])
    # not the parts of a compiled block, a list of different modules, nor the whole
    assert not any(compiled(part) for block in model.blocks for part in block.parts)
    assert not any(compiled(module) for module in [*model.mixed, model])
    flat = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    assert compile_repeated_blocks(flat) == 0 and compiled(flat)


async def test_a_batching_loop_that_ends_makes_the_model_unusable(tiny_model):
    backend = TransformersBackend(ModelSettings(path=str(tiny_model), warmup=False))
    await backend.start()
    try:
        assert backend.health()["state"] == "idle"

        async def a_bug() -> None:
            raise RuntimeError("a bug in the batcher")

        backend._batching.cancel()
        backend._batching = asyncio.create_task(a_bug())
        await asyncio.sleep(0.05)
        health = backend.health()
    finally:
        await backend.close()
    assert health["state"] == "failed" and "a bug in the batcher" in health["fatal"]


class OutOfMemoryAbove:
    """The real runner, except that batches larger than `limit` raise CUDA's out-of-memory
    error (injected: this machine has no GPU to run out of)."""

    def __init__(self, runner: ModelRunner, limit: int, error: Exception) -> None:
        self.runner = runner
        self.limit = limit
        self.error = error
        self.sizes: list[int] = []
        self.failed_tensors: list[weakref.ref] = []  # of the passes that ran out of memory
        self.still_held: list[int] = []  # how many of those each later pass found alive

    def collate(self, requests):
        return self.runner.collate(requests)

    def forward(self, requests, inputs):
        self.still_held.append(sum(ref() is not None for ref in self.failed_tensors))
        self.sizes.append(len(requests))
        if len(requests) > self.limit:
            activations = torch.ones(len(requests), 1024)
            self.failed_tensors += [weakref.ref(activations), weakref.ref(inputs["input_ids"])]
            raise type(self.error)(*self.error.args)  # a fresh one, as torch raises
        return self.runner.forward(requests, inputs)


class SlowPasses:
    """The real runner, each pass taking at least `seconds` (as a busy GPU's would)."""

    def __init__(self, runner: ModelRunner, seconds: float) -> None:
        self.runner, self.seconds = runner, seconds
        self.batches: list[list[str]] = []

    def collate(self, requests):
        return self.runner.collate(requests)

    def forward(self, requests, inputs):
        self.batches.append([request.query.prompt for request in requests])
        time.sleep(self.seconds)
        return self.runner.forward(requests, inputs)


async def test_requests_that_arrive_during_a_pass_share_the_next_batch(tiny_model):
    runner = SlowPasses(ModelRunner.load(ModelSettings(path=str(tiny_model))), 0.4)
    with ThreadPoolExecutor(1) as model_pool, ThreadPoolExecutor(2) as prep_pool:
        batcher = MicroBatcher(
            runner, max_batch=16, max_wait_s=0.01, model_pool=model_pool, prep_pool=prep_pool
        )
        running = asyncio.create_task(batcher.run())
        asked = []
        for prompt in ("r1", "r2", "r3", "r4"):
            asked.append(
                asyncio.create_task(batcher.submit(ModelRequest(ChoiceQuery(prompt, YES_NO), [])))
            )
            await asyncio.sleep(0.1)
        await asyncio.gather(*asked)
        running.cancel()
    # r1 alone; r2 (during r1's pass) next; r3 and r4 (during r2's) together: the batch
    # after the one running is formed once the model takes it, not as soon as it is queued
    assert runner.batches == [["r1"], ["r2"], ["r3", "r4"]]


async def test_a_request_given_up_before_its_batch_forms_does_not_count_towards_it(tiny_model):
    runner = SlowPasses(ModelRunner.load(ModelSettings(path=str(tiny_model))), 0)
    with ThreadPoolExecutor(1) as model_pool, ThreadPoolExecutor(2) as prep_pool:
        batcher = MicroBatcher(
            runner, max_batch=2, max_wait_s=1.0, model_pool=model_pool, prep_pool=prep_pool
        )
        running = asyncio.create_task(batcher.run())
        ask = [
            asyncio.create_task(batcher.submit(ModelRequest(ChoiceQuery(prompt, YES_NO), [])))
            for prompt in ("r1", "r2")
        ]
        await asyncio.sleep(0)
        ask[1].cancel()
        await asyncio.sleep(0.2)
        assert batcher.report()["waiting"] == 1
        ask.append(asyncio.create_task(batcher.submit(ModelRequest(ChoiceQuery("r3", YES_NO), []))))
        await asyncio.gather(ask[0], ask[2])
        running.cancel()
    # r1 waited for company: the cancelled r2 did not fill its batch
    assert runner.batches == [["r1", "r3"]]
    # waiting requests are told apart by identity (equal ones would compare their pictures)
    same = ModelRequest(ChoiceQuery("r1", YES_NO), [Image.new("RGB", (56, 56))])
    loop = asyncio.get_running_loop()
    assert _Waiting(same, loop.create_future()) != _Waiting(same, loop.create_future())


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        # what torch's CPU allocator raises
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 90183693636 bytes. Error code 12"
        ),
        # a CUDA library's own allocation: a plain RuntimeError, the context still usable
        RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be ..."),
    ],
    ids=["cuda", "cpu", "cuda-library"],
)
async def test_an_out_of_memory_batch_is_split_and_retried(tiny_model, error):
    runner = ModelRunner.load(ModelSettings(path=str(tiny_model)))
    flaky = OutOfMemoryAbove(runner, limit=2, error=error)
    with ThreadPoolExecutor(1) as model_pool, ThreadPoolExecutor(2) as prep_pool:
        batcher = MicroBatcher(
            flaky, max_batch=8, max_wait_s=0.3, model_pool=model_pool, prep_pool=prep_pool
        )
        running = asyncio.create_task(batcher.run())
        requests = [r for r in mixed_requests() if isinstance(r.query, ChoiceQuery)]
        answers = await asyncio.gather(*(batcher.submit(r) for r in requests))
        running.cancel()
    for request, answer in zip(requests, answers, strict=True):
        assert_same(answer, runner.run(request))
    assert (
        flaky.sizes[0] == 6 and max(flaky.sizes[1:]) <= 3 and sum(s <= 2 for s in flaky.sizes) >= 3
    )
    assert batcher.health.oom_splits >= 2 and batcher.health.failures == 0
    # the halves run with the failed pass's tensors (its inputs, its activations) let go
    assert len(flaky.failed_tensors) >= 4 and not any(flaky.still_held)


async def rounds_of_eight(
    tiny_model: Path, fits: list[int]
) -> tuple[OutOfMemoryAbove, list[int], MicroBatcher]:
    """Rounds of eight requests through a batcher (max_batch 8) over a runner that runs out
    of memory above `fits[i]` in round i; the runner, and the batch limit after each round."""
    runner = ModelRunner.load(ModelSettings(path=str(tiny_model)))
    flaky = OutOfMemoryAbove(runner, limit=0, error=torch.OutOfMemoryError("CUDA out of memory."))
    choice = [r for r in mixed_requests() if isinstance(r.query, ChoiceQuery)]
    requests = choice + choice[:2]  # eight
    limits = []
    with ThreadPoolExecutor(1) as model_pool, ThreadPoolExecutor(2) as prep_pool:
        batcher = MicroBatcher(
            flaky, max_batch=8, max_wait_s=0.3, model_pool=model_pool, prep_pool=prep_pool
        )
        running = asyncio.create_task(batcher.run())
        for fit in fits:
            flaky.limit = fit
            await asyncio.gather(*(batcher.submit(r) for r in requests))
            limits.append(batcher.report()["batch_limit"])
        running.cancel()
    return flaky, limits, batcher


async def test_batches_stay_below_the_size_that_ran_out_of_memory_then_probe_it_again(
    tiny_model, monkeypatch
):
    monkeypatch.setattr("daemon.inference.batch_limit.PROBE_AFTER", 3)
    flaky, limits, batcher = await rounds_of_eight(tiny_model, [4, 4, 4, 4])
    # 8 ran out and its halves fit: batches of 4 from then on; after three full passes of 4
    # the limit is 8 again, and the next 8 run out once more
    assert flaky.sizes == [8, 4, 4, 4, 4, 4, 4, 8, 4, 4]
    assert limits == [4, 4, 8, 4] and batcher.health.oom_splits == 2


async def test_a_probe_whose_halves_run_out_too_lowers_the_limit_below_them(
    tiny_model, monkeypatch
):
    monkeypatch.setattr("daemon.inference.batch_limit.PROBE_AFTER", 3)
    # less memory free by the time 8 is tried again
    flaky, limits, _ = await rounds_of_eight(tiny_model, [4, 4, 4, 2])
    # the try at 8 runs out, and so do its halves of 4, the size confirmed before: the
    # limit falls to the quarters that fit, not back to 4 (to run out once more)
    assert flaky.sizes == [8, 4, 4, 4, 4, 4, 4, 8, 4, 2, 2, 4, 2, 2]
    assert limits == [4, 4, 8, 2]


class OutOfMemoryWith(OutOfMemoryAbove):
    """Any batch that holds `culprit` runs out of memory, alone too."""

    def __init__(self, runner: ModelRunner, culprit: ModelRequest) -> None:
        super().__init__(runner, limit=0, error=torch.OutOfMemoryError("CUDA out of memory."))
        self.culprit = culprit

    def forward(self, requests, inputs):
        self.sizes.append(len(requests))
        if any(request is self.culprit for request in requests):
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return self.runner.forward(requests, inputs)


async def test_one_request_that_fits_no_batch_leaves_the_limit_alone(tiny_model):
    runner = ModelRunner.load(ModelSettings(path=str(tiny_model)))
    choice = [r for r in mixed_requests() if isinstance(r.query, ChoiceQuery)]
    requests = choice + choice[:2]
    flaky = OutOfMemoryWith(runner, culprit=requests[5])
    answers, batcher = await batched(flaky, requests)
    assert [isinstance(a, torch.OutOfMemoryError) for a in answers] == [False] * 5 + [
        True,
        False,
        False,
    ]
    # 8, then its halves down to the culprit alone: the others fit in every size tried
    assert flaky.sizes == [8, 4, 4, 2, 1, 1, 2]
    assert batcher.report()["batch_limit"] == 8


async def test_a_batch_formed_before_the_limit_fell_is_cut_to_it(tiny_model):
    runner = ModelRunner.load(ModelSettings(path=str(tiny_model)))
    flaky = OutOfMemoryAbove(runner, limit=8, error=torch.OutOfMemoryError("CUDA out of memory."))
    choice = [r for r in mixed_requests() if isinstance(r.query, ChoiceQuery)]
    with ThreadPoolExecutor(1) as model_pool, ThreadPoolExecutor(2) as prep_pool:
        batcher = MicroBatcher(
            flaky, max_batch=8, max_wait_s=0.3, model_pool=model_pool, prep_pool=prep_pool
        )
        loop = asyncio.get_running_loop()
        items = [_Waiting(r, loop.create_future()) for r in choice]
        inputs = await batcher._inputs(items)  # collated at 6, then the limit falls to 4
        batcher.limit.value = 4
        await batcher._forward(items, inputs)
    assert flaky.sizes == [4, 2] and all(item.future.done() for item in items)
    for item, request in zip(items, choice, strict=True):
        assert_same(item.future.result(), runner.run(request))


def test_a_raised_limit_that_runs_out_again_waits_twice_as_long_before_the_next_try():
    limit = BatchLimit(16)
    limit.ran_out(SplitOutcome(largest_passed=8))
    waits = []
    for _ in range(3):
        passes = 0
        while limit.value == 8:
            limit.passed(8)
            passes += 1
        waits.append(passes)
        assert limit.value == 16
        limit.ran_out(SplitOutcome(largest_passed=8))  # the try at 16 ran out again
    assert waits == [PROBE_AFTER, 2 * PROBE_AFTER, 4 * PROBE_AFTER]
    limit.passed(8)
    while limit.value == 8:
        limit.passed(8)
    limit.passed(16)  # this time 16 fits: the next lowering waits PROBE_AFTER again
    limit.ran_out(SplitOutcome(largest_passed=8))
    passes = 0
    while limit.value == 8:
        limit.passed(8)
        passes += 1
    assert passes == PROBE_AFTER
    # smaller passes count for nothing; a part that failed alone, or no part that passed,
    # changes nothing
    limit.ran_out(SplitOutcome(largest_passed=4, lone_failure=True))
    limit.ran_out(SplitOutcome())
    assert limit.value == 16
    # a try at 16 that runs out in a batch of 12, whose halves of 6 pass: 8 stays, proven
    limit.ran_out(SplitOutcome(largest_passed=8))
    while limit.value == 8:
        limit.passed(8)
    limit.ran_out(SplitOutcome(largest_passed=6, smallest_failed=12))
    assert limit.value == 8
    # a try at 16 whose halves of 8 run out too, their quarters passing: 8 no longer fits
    while limit.value == 8:
        limit.passed(8)
    limit.ran_out(SplitOutcome(largest_passed=4, smallest_failed=8))
    assert limit.value == 4


async def test_a_request_whose_answers_cannot_be_scored_fails_alone(tiny_model):
    runner = ModelRunner.load(ModelSettings(path=str(tiny_model)))
    good = ModelRequest(ChoiceQuery("Is there fire?", YES_NO), [Image.new("RGB", (56, 56))])
    # two labels that share their only first token: no score tells them apart
    bad = ModelRequest(
        ChoiceQuery("Fire?", {"yes": ["yes"], "also": ["yes"]}), [Image.new("RGB", (56, 56))]
    )
    with ThreadPoolExecutor(1) as model_pool, ThreadPoolExecutor(2) as prep_pool:
        batcher = MicroBatcher(
            runner, max_batch=8, max_wait_s=0.3, model_pool=model_pool, prep_pool=prep_pool
        )
        running = asyncio.create_task(batcher.run())
        answers = await asyncio.gather(
            batcher.submit(good), batcher.submit(bad), return_exceptions=True
        )
        running.cancel()
    assert_same(answers[0], runner.run(good))
    assert isinstance(answers[1], ValueError) and "no first token distinct" in str(answers[1])


def test_scores_that_are_not_finite_fail_their_request_and_no_other(tiny_model, monkeypatch):
    runner = ModelRunner.load(ModelSettings(path=str(tiny_model)))
    real = runner.model.forward

    def overflowing(*args, **kwargs):  # the second request's scores overflow (as float16 can)
        out = real(*args, **kwargs)
        out.logits[1:] = float("nan")
        return out

    monkeypatch.setattr(runner.model, "forward", overflowing)
    requests = [
        ModelRequest(ChoiceQuery("Is there fire?", YES_NO), [Image.new("RGB", (56, 56), c)])
        for c in ((0, 0, 0), (200, 0, 0))
    ]
    first, second = runner.run_batch(requests)
    assert isinstance(first, ChoiceAnswer)
    assert isinstance(second, ValueError) and "not finite numbers" in str(second)


class NeverFits(TransformersBackend):
    """A backend whose every pass runs out of memory."""

    async def start(self) -> None:
        await super().start()
        self._batcher.runner = OutOfMemoryAbove(
            self._runner, limit=0, error=torch.OutOfMemoryError("CUDA out of memory.")
        )


class NeverFitsPlugin:
    @hookimpl
    def register_backends(self, register):
        register("never-fits", NeverFits)


async def test_a_request_that_never_fits_falls_back_to_on_error(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    settings = settings.model_copy(
        update={"model": settings.model.model_copy(update={"backend": "never-fits"})}
    )
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    (settings.rules.dir / "smoke.toml").write_text(
        FIRE_RULE.replace('"fire"', '"smoke"') + 'on_error = "drop"\n'
    )
    async with run_daemon(settings, extra_plugins=[NeverFitsPlugin()]) as d:
        await d.post_alert(make_alert("oom-1"))
        await d.post_alert(make_alert("oom-2", event_type="smoke"))
        forwarded = (await d.wait_reviewed("oom-1"))["verdicts"]
        dropped = (await d.wait_reviewed("oom-2"))["verdicts"]
        async with d.http.get(f"{d.base_url}/healthz") as response:
            worker = (await response.json())["model_worker"]
    [verdict] = forwarded
    assert verdict["verdict"] == "unreviewed" and "CUDA out of memory" in verdict["reason"]
    assert dropped == []
    assert worker["failures"] == 2 and worker["state"] == "idle"


async def test_a_request_that_breaks_its_batchs_collation_fails_alone(tiny_model):
    runner = ModelRunner.load(ModelSettings(path=str(tiny_model)))
    with ThreadPoolExecutor(1) as model_pool, ThreadPoolExecutor(2) as prep_pool:
        batcher = MicroBatcher(
            runner, max_batch=8, max_wait_s=0.3, model_pool=model_pool, prep_pool=prep_pool
        )
        running = asyncio.create_task(batcher.run())
        good = [r for r in mixed_requests() if isinstance(r.query, ChoiceQuery)][:4]
        # a placeholder for an image the request does not have: the batch cannot collate
        bad = ModelRequest(ChoiceQuery("Fire? <|image_pad|>", YES_NO), good[0].images)
        answers = await asyncio.gather(
            *(batcher.submit(r) for r in [good[0], bad, *good[1:]]), return_exceptions=True
        )
        running.cancel()
    assert isinstance(answers[1], Exception)
    for request, answer in zip(good, [answers[0], *answers[2:]], strict=True):
        assert_same(answer, runner.run(request))
    assert batcher.health.batches == 1 and batcher.health.requests == 4
    assert batcher.health.failures == 1  # a request failed at collation is a failure too


class AnswersOneTooFew:
    """A runner with a bug: its first pass leaves out the last answer."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.passes = 0

    def collate(self, requests):
        return self.runner.collate(requests)

    def forward(self, requests, inputs):
        self.passes += 1
        answers = self.runner.forward(requests, inputs)
        return answers[:-1] if self.passes == 1 else answers


async def test_a_runner_that_miscounts_its_answers_fails_that_batch_only(tiny_model):
    runner = ModelRunner.load(ModelSettings(path=str(tiny_model)))
    with ThreadPoolExecutor(1) as model_pool, ThreadPoolExecutor(2) as prep_pool:
        batcher = MicroBatcher(
            AnswersOneTooFew(runner), max_batch=8, max_wait_s=0.3, model_pool=model_pool,
            prep_pool=prep_pool,
        )  # fmt: skip
        running = asyncio.create_task(batcher.run())
        requests = [r for r in mixed_requests() if isinstance(r.query, ChoiceQuery)][:3]
        failed = await asyncio.gather(
            *(batcher.submit(r) for r in requests), return_exceptions=True
        )
        [answer] = await asyncio.gather(batcher.submit(requests[0]))  # the batcher goes on
        running.cancel()
    assert all("the model gave 2 answers to 3 requests" in str(error) for error in failed)
    assert_same(answer, runner.run(requests[0]))


async def batched(runner, requests: list[ModelRequest]) -> tuple[list, MicroBatcher]:
    """The requests' answers (or errors) through a batcher over `runner`, all at once."""
    with ThreadPoolExecutor(1) as model_pool, ThreadPoolExecutor(2) as prep_pool:
        batcher = MicroBatcher(
            runner, max_batch=8, max_wait_s=0.3, model_pool=model_pool, prep_pool=prep_pool
        )
        running = asyncio.create_task(batcher.run())
        answers = await asyncio.gather(
            *(batcher.submit(r) for r in requests), return_exceptions=True
        )
        running.cancel()
    return answers, batcher


async def test_an_image_the_processor_would_refuse_sends_no_batch_mate_to_it(tiny_model):
    runner = ModelRunner.load(ModelSettings(path=str(tiny_model)))
    images = [
        Image.new("RGB", (588, 336), (200, 40, 40)),  # fits: patched directly
        Image.new("RGB", (7168, 28), (40, 200, 40)),  # a strip the processor refuses (> 200:1)
        Image.new("RGB", (28, 28), (40, 40, 200)),  # under the processor's minimum
    ]
    requests = [ModelRequest(ChoiceQuery("Fire? Answer yes or no.", YES_NO), [i]) for i in images]
    answers, batcher = await batched(runner, requests)
    for request, answer in zip(requests, answers, strict=True):
        assert_same(answer, runner.run(request))
    assert batcher.health.batches == 1


async def test_a_request_longer_than_the_context_fails_alone_naming_its_length(tiny_model):
    runner = ModelRunner.load(ModelSettings(path=str(tiny_model)))
    runner.context = 120  # a small model's context, for the test
    short = [
        ModelRequest(ChoiceQuery(f"Fire {i}? Answer yes or no.", YES_NO), []) for i in range(3)
    ]
    long = ModelRequest(ChoiceQuery("Fire? " * 200 + "Answer yes or no.", YES_NO), [])
    answers, _ = await batched(runner, [short[0], long, *short[1:]])
    assert isinstance(answers[1], ValueError)
    assert "tokens (prompt and images), over the 120 the model's context" in str(answers[1])
    for request, answer in zip(short, [answers[0], *answers[2:]], strict=True):
        assert_same(answer, runner.run(request))


class CollatesTwoAtMost:
    """A runner whose batches of more than two requests do not collate, though each alone
    does (as an odd combination of inputs might)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.passes: list[int] = []

    def collate(self, requests):
        if len(requests) > 2:
            raise ValueError("these do not go together")
        return self.runner.collate(requests)

    def forward(self, requests, inputs):
        self.passes.append(len(requests))
        return self.runner.forward(requests, inputs)


async def test_requests_that_collate_alone_but_not_together_go_on_in_smaller_groups(tiny_model):
    runner = CollatesTwoAtMost(ModelRunner.load(ModelSettings(path=str(tiny_model))))
    requests = [r for r in mixed_requests() if isinstance(r.query, ChoiceQuery)][:4]
    answers, _ = await batched(runner, requests)
    for request, answer in zip(requests, answers, strict=True):
        assert_same(answer, runner.runner.run(request))
    assert runner.passes == [2, 2]


def test_extraction_is_greedy_whatever_the_snapshots_generation_config(tiny_model, tmp_path):
    snapshot = tmp_path / "model"
    shutil.copytree(tiny_model, snapshot)
    config = (
        json.loads((snapshot / "generation_config.json").read_text())
        if (snapshot / "generation_config.json").exists()
        else {}
    )
    (snapshot / "generation_config.json").write_text(
        json.dumps(config | {"repetition_penalty": 10.0, "do_sample": False})
    )
    runner = ModelRunner.load(ModelSettings(path=str(snapshot), max_new_tokens=12))
    request = ModelRequest(GenerateQuery("Count the people. " * 3, 12), [])
    inputs = runner.collate([request])
    with torch.inference_mode():
        greedy, penalised = (
            runner.model.generate(
                **inputs,
                max_new_tokens=12,
                do_sample=False,
                repetition_penalty=penalty,
                pad_token_id=runner.tokenizer.pad_token_id,
            )[0, inputs["input_ids"].shape[1] :]
            for penalty in (1.0, 10.0)
        )
    assert not torch.equal(greedy, penalised)  # the snapshot's penalty would change the answer
    expected = runner.tokenizer.decode(greedy, skip_special_tokens=True).strip()
    assert runner.run(request).text == expected


class StopsIterating:
    """A runner with a bug that raises StopIteration (which asyncio cannot hand to a
    future) when collating or running a request whose prompt says so."""

    def __init__(self, runner: ModelRunner, where: str) -> None:
        self.runner = runner
        self.where = where

    def _maybe_stop(self, requests, where: str) -> None:
        if where == self.where and any("stop" in r.query.prompt for r in requests):
            raise StopIteration

    def collate(self, requests):
        self._maybe_stop(requests, "collate")
        return self.runner.collate(requests)

    def forward(self, requests, inputs):
        self._maybe_stop(requests, "forward")
        return self.runner.forward(requests, inputs)


@pytest.mark.parametrize("where", ["collate", "forward"])
async def test_a_stop_iteration_from_the_runner_fails_its_requests_instead_of_hanging(
    tiny_model, where
):
    runner = ModelRunner.load(ModelSettings(path=str(tiny_model)))
    good = next(r for r in mixed_requests() if isinstance(r.query, ChoiceQuery))
    stop = ModelRequest(ChoiceQuery("stop? Answer yes or no.", YES_NO), good.images)
    with ThreadPoolExecutor(1) as model_pool, ThreadPoolExecutor(2) as prep_pool:
        batcher = MicroBatcher(
            StopsIterating(runner, where), max_batch=8, max_wait_s=0.0, model_pool=model_pool,
            prep_pool=prep_pool,
        )  # fmt: skip
        running = asyncio.create_task(batcher.run())
        async with asyncio.timeout(30):
            [failed] = await asyncio.gather(batcher.submit(stop), return_exceptions=True)
            answer = await batcher.submit(good)  # the batcher goes on
        running.cancel()
    assert isinstance(failed, RuntimeError) and "StopIteration raised by" in str(failed)
    assert_same(answer, runner.run(good))


class PoisonsTheDevice:
    """A runner whose first pass meets a CUDA error that leaves the context unusable."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.passes = 0

    def collate(self, requests):
        return self.runner.collate(requests)

    def forward(self, requests, inputs):
        self.passes += 1
        if self.passes == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.runner.forward(requests, inputs)


async def test_batches_collated_before_the_device_failed_never_reach_it(tiny_model):
    runner = PoisonsTheDevice(ModelRunner.load(ModelSettings(path=str(tiny_model))))
    requests = [r for r in mixed_requests() if isinstance(r.query, ChoiceQuery)][:4]
    with ThreadPoolExecutor(1) as model_pool, ThreadPoolExecutor(2) as prep_pool:
        batcher = MicroBatcher(
            runner, max_batch=1, max_wait_s=0.0, model_pool=model_pool, prep_pool=prep_pool
        )
        running = asyncio.create_task(batcher.run())
        answers = await asyncio.gather(
            *(batcher.submit(r) for r in requests), return_exceptions=True
        )
        running.cancel()
    assert all(isinstance(a, BackendUnusable) for a in answers), answers
    assert runner.passes == 1  # the batches collated meanwhile were failed, not run
