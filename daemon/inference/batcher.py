"""Micro-batching: requests waiting for one model share its passes.

Two stages run side by side. The collector takes the oldest waiting request and those of
the same kind behind it — up to `max_batch`, waiting at most `max_wait_s` after the oldest
arrived for company — and collates them on the preparation pool (chat template, tokens,
image patches: CPU work). The model stage runs collated batches one at a time on the
model's own thread. So the next batch is prepared while the model works on this one.

A batch that runs out of accelerator memory is split in halves and retried; a single
request that still does not fit fails alone (its rule's `on_error` decides what follows).
The batches formed next are no larger than the parts that fit (see `batch_limit`).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
import torch

from daemon.inference.batch_limit import BatchLimit, SplitOutcome
from daemon.inference.runner import query_kind
from daemon.plugin_api import Answer, BackendUnusable, ModelRequest
from daemon.waiting import wait_event

log = structlog.get_logger(__name__)


class BatchRunner(Protocol):
    def collate(self, requests: Sequence[ModelRequest]) -> Any: ...

    def forward(
        self, requests: Sequence[ModelRequest], inputs: Any
    ) -> list[Answer | Exception]: ...


@dataclass(eq=False)  # compared by identity: equal requests would compare their pictures
class _Waiting:
    request: ModelRequest
    future: asyncio.Future[Answer]
    since: float = field(default_factory=time.monotonic)


@dataclass
class WorkerHealth:
    """What the model worker has done, for /healthz and the watchdog."""

    batches: int = 0
    requests: int = 0
    oom_splits: int = 0
    #: requests failed here: at collation, by a pass that failed, or alone in their pass
    failures: int = 0
    #: time.monotonic() when the running batch started (None: idle)
    busy_since: float | None = None
    #: seconds spent in passes, all told (busy_s over wall time: how busy the device was)
    busy_s: float = 0.0
    last_batch_at: float | None = None
    largest_batch: int = 0
    #: how many batches of each size ran (for the metrics' histogram)
    batch_sizes: dict[int, int] = field(default_factory=dict)
    #: set when a device error left the model unusable
    fatal: str | None = None

    def report(self, waiting: int) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "state": "failed" if self.fatal else "busy" if self.busy_since is not None else "idle",
            "fatal": self.fatal,
            "busy_for_s": round(now - self.busy_since, 3) if self.busy_since else 0.0,
            "busy_s": round(self.busy_s, 3),
            "last_batch_s_ago": round(now - self.last_batch_at, 3) if self.last_batch_at else None,
            "batches": self.batches,
            "requests": self.requests,
            "largest_batch": self.largest_batch,
            "batch_sizes": dict(self.batch_sizes),
            "oom_splits": self.oom_splits,
            "failures": self.failures,
            "waiting": waiting,
        }


class MicroBatcher:
    def __init__(
        self,
        runner: BatchRunner,
        *,
        max_batch: int,
        max_wait_s: float,
        model_pool: Executor,
        prep_pool: Executor,
        out_of_memory: tuple[type[BaseException], ...] = (torch.OutOfMemoryError,),
    ) -> None:
        self.runner = runner
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.model_pool = model_pool
        self.prep_pool = prep_pool
        self.out_of_memory = out_of_memory
        self.health = WorkerHealth()
        self.limit = BatchLimit(max_batch)
        self._waiting: deque[_Waiting] = deque()
        self._arrived = asyncio.Event()
        self._collated: asyncio.Queue[tuple[list[_Waiting], Any]] = asyncio.Queue(maxsize=1)
        #: set when the model stage takes a collated batch
        self._taken = asyncio.Event()

    async def submit(self, request: ModelRequest) -> Answer:
        if self.health.fatal:
            raise BackendUnusable(self.health.fatal)
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        item = _Waiting(request, future)
        self._waiting.append(item)
        self._arrived.set()
        try:
            return await future
        finally:
            if future.cancelled() and item in self._waiting:
                # its caller gave up: it no longer counts towards the batch being formed
                self._waiting.remove(item)

    async def run(self) -> None:
        """Both stages, until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._collect())
            group.create_task(self._run_batches())

    # collector -----------------------------------------------------------------------------

    async def _collect(self) -> None:
        while True:
            # one batch ahead of the model, not two: the next is formed once the model has
            # taken the one before, so that requests arriving during a pass can join it
            while self._collated.full():
                self._taken.clear()
                await self._taken.wait()
            batch = await self._next_batch()
            groups = await self._collate(batch) if batch else []
            while groups:
                # handed over, not kept here: the model stage holds the inputs only as long
                # as it needs them
                await self._collated.put(groups.pop(0))

    async def _collate(self, batch: list[_Waiting]) -> list[tuple[list[_Waiting], Any]]:
        """The batch and its inputs. When a batch does not collate, each request is tried
        alone: those that fail alone fail, and the others go on without them, together
        or, if they still do not collate together, in halves."""
        try:
            return [(batch, await self._inputs(batch))]
        except Exception as exc:
            if len(batch) == 1:
                self._give_up(batch, exc)
                return []
        fit = []
        for item in batch:
            try:
                await self._inputs([item])
            except Exception as exc:
                self._give_up([item], exc)
            else:
                fit.append(item)
        # all of them together failed already: halves at once
        return await self._in_groups(fit, tried=len(fit) == len(batch))

    async def _in_groups(
        self, items: list[_Waiting], *, tried: bool = False
    ) -> list[tuple[list[_Waiting], Any]]:
        """`items` and their inputs, in as few groups as collate together (`tried`: they
        did not, as one group); a single request that does not collate fails."""
        if not items:
            return []
        if not tried:
            try:
                return [(items, await self._inputs(items))]
            except Exception as exc:
                if len(items) == 1:
                    self._give_up(items, exc)
                    return []
        half = len(items) // 2
        return await self._in_groups(items[:half]) + await self._in_groups(items[half:])

    async def _inputs(self, items: list[_Waiting]) -> Any:
        """The collated inputs of these requests (on the prep pool)."""
        return await self._in(self.prep_pool, self.runner.collate, _requests(items))

    async def _next_batch(self) -> list[_Waiting]:
        """The oldest waiting request and those of its kind behind it, up to the batch limit."""
        while True:
            while self._waiting and self._waiting[0].future.done():
                self._waiting.popleft()  # its caller gave up (see submit)
            if self._waiting:
                break
            self._arrived.clear()
            await self._arrived.wait()
        kind = query_kind(self._waiting[0].request)
        deadline = self._waiting[0].since + self.max_wait_s
        limit = self.limit.value
        while self._count(kind) < limit and (wait := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            if not await wait_event(self._arrived, wait):
                break
        batch, rest = [], deque()
        while self._waiting:
            item = self._waiting.popleft()
            if item.future.done():
                continue  # its caller gave up (shutdown)
            if query_kind(item.request) == kind and len(batch) < limit:
                batch.append(item)
            else:
                rest.append(item)
        self._waiting = rest
        if batch:
            waited_ms = round((time.monotonic() - batch[0].since) * 1000, 1)
            log.debug("batch formed", size=len(batch), kind=kind, oldest_waited_ms=waited_ms)
        return batch

    def _count(self, kind: str) -> int:
        return sum(
            1
            for item in self._waiting
            if not item.future.done() and query_kind(item.request) == kind
        )

    # model stage ---------------------------------------------------------------------------

    async def _run_batches(self) -> None:
        while True:
            await self._forward(*await self._take())  # no reference kept to the inputs

    async def _take(self) -> tuple[list[_Waiting], Any]:
        item = await self._collated.get()
        self._taken.set()
        return item

    async def _forward(
        self, batch: list[_Waiting], inputs: Any = None, split: SplitOutcome | None = None
    ) -> None:
        """One pass over a collated batch (`inputs`: None to collate it here); a batch that
        runs out of memory is split in halves, each retried (`split`: what the parts of the
        batch they come from do)."""
        health = self.health
        if health.fatal:  # collated before the model became unusable: not passed to it
            _fail(batch, BackendUnusable(health.fatal))
            return
        if split is None and len(batch) > (limit := self.limit.value):
            del inputs  # formed before a batch ran out of memory at a smaller size
            for start in range(0, len(batch), limit):
                await self._forward(batch[start : start + limit])
            return
        if inputs is None:
            groups = await self._collate(batch)
            while len(groups) > 1:  # some would not collate together: each group on its own
                await self._forward(*groups.pop(0), split)
            if not groups:
                return
            batch, inputs = groups.pop()  # `del inputs` below must free them
        try:
            answers = await self._timed_pass(batch, inputs)
            if len(answers) != len(batch):  # a backend's bug: fail the batch, not the batcher
                raise RuntimeError(
                    f"the model gave {len(answers)} answers to {len(batch)} requests"
                )
        except Exception as exc:
            if isinstance(exc, self.out_of_memory) or is_other_out_of_memory(exc):
                # its traceback holds the failed pass's frames, and so its tensors on the device
                out_of_memory = exc.with_traceback(None)
            else:
                self._failed(batch, exc)
                return
        else:
            health.batches += 1
            health.requests += len(batch)
            health.largest_batch = max(health.largest_batch, len(batch))
            health.batch_sizes[len(batch)] = health.batch_sizes.get(len(batch), 0) + 1
            health.last_batch_at = time.monotonic()
            self.limit.passed(len(batch))
            if split is not None:
                split.passed(len(batch))
            for item, answer in zip(batch, answers, strict=True):
                if item.future.done():
                    continue
                if isinstance(answer, Exception):  # this request's alone (see ModelRunner)
                    health.failures += 1
                    item.future.set_exception(answer)
                else:
                    item.future.set_result(answer)
            return
        # out of memory: the halves run once the failed pass's memory is free
        del inputs
        _release_cached_memory()
        outcome = split or SplitOutcome()
        outcome.failed(len(batch))
        if len(batch) == 1:
            outcome.lone_failure = True
            self._give_up(batch, out_of_memory)
            return
        health.oom_splits += 1
        half = len(batch) // 2
        log.warning("out of memory: splitting the batch", size=len(batch))
        for part in (batch[:half], batch[half:]):
            await self._forward(part, split=outcome)
        if split is None:  # the first batch of the splits: what its parts did sets the limit
            self.limit.ran_out(outcome)

    def _give_up(self, items: list[_Waiting], error: BaseException) -> None:
        """Fail the requests still waiting for an answer, each counted as a failure."""
        self.health.failures += _fail(items, error)

    def _failed(self, batch: list[_Waiting], exc: Exception) -> None:
        """A pass that failed otherwise than by running out of memory."""
        health = self.health
        if (fatal := unusable_because(exc)) is not None:
            health.fatal = fatal
            log.critical("the model is unusable", error=str(exc))
            self._give_up(batch, BackendUnusable(fatal))
            self._fail_waiting(BackendUnusable(fatal))
            return
        self._give_up(batch, exc)

    async def _timed_pass(self, batch: list[_Waiting], inputs: Any) -> list[Answer | Exception]:
        health = self.health
        health.busy_since = started = time.monotonic()
        try:
            return await self._in(self.model_pool, self.runner.forward, _requests(batch), inputs)
        finally:
            health.busy_s += time.monotonic() - started
            health.busy_since = None

    @staticmethod
    async def _in(pool: Executor, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, _no_stop_iteration, fn, *args)

    def report(self) -> dict[str, Any]:
        # the largest batch formed now: max_batch, or less since a batch ran out of memory
        return {**self.health.report(len(self._waiting)), "batch_limit": self.limit.value}

    def _fail_waiting(self, error: BaseException) -> None:
        _fail(list(self._waiting), error)
        self._waiting.clear()


#: what CUDA errors that leave the context unusable say (out of memory is not one of them)
DEVICE_FATAL_MARKERS = (
    "CUDA error",
    "device-side assert",
    "illegal memory access",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "CUDNN_STATUS_EXECUTION_FAILED",
    "unspecified launch failure",
)


def unusable_because(error: BaseException) -> str | None:
    """Why the model cannot be used after this error (a dead model process, a poisoned
    device), or None when only this batch failed."""
    if isinstance(error, BackendUnusable):
        return str(error)
    if is_device_fatal(error):
        return f"the model's device failed: {error}"
    return None


#: out of memory said otherwise than by torch.OutOfMemoryError: torch's CPU allocator, and
#: allocations inside CUDA libraries ("CUDA error: out of memory" from a kernel's or cuBLAS's
#: own allocation): not sticky, the context stays usable, so the batch is split as for OOM
OTHER_OUT_OF_MEMORY_MARKERS = ("can't allocate memory", "out of memory", "ALLOC_FAILED")


def is_other_out_of_memory(error: BaseException) -> bool:
    """Out of memory, though not a torch.OutOfMemoryError (see OTHER_OUT_OF_MEMORY_MARKERS)."""
    text = str(error)
    return isinstance(error, RuntimeError) and any(m in text for m in OTHER_OUT_OF_MEMORY_MARKERS)


def is_device_fatal(error: BaseException) -> bool:
    """A device error after which the process must restart to use the GPU again."""
    if isinstance(error, torch.OutOfMemoryError) or is_other_out_of_memory(error):
        return False
    text = str(error)
    return any(marker in text for marker in DEVICE_FATAL_MARKERS)


def _no_stop_iteration(fn: Any, *args: Any) -> Any:
    """`fn(*args)`, a StopIteration turned into a RuntimeError: asyncio cannot set a
    StopIteration on a future, which would then never be resolved."""
    try:
        return fn(*args)
    except StopIteration as exc:
        raise RuntimeError(
            f"StopIteration raised by {getattr(fn, '__qualname__', fn)}: {exc!r}"
        ) from None


def _requests(batch: list[_Waiting]) -> list[ModelRequest]:
    return [item.request for item in batch]


def _fail(batch: list[_Waiting], error: BaseException) -> int:
    """Fail the requests still waiting for an answer; how many."""
    failed = [item for item in batch if not item.future.done()]
    for item in failed:
        item.future.set_exception(error)
    return len(failed)


def _release_cached_memory() -> None:
    """After a pass ran out of memory: its tensors that only a reference cycle still holds
    (a traceback kept by a future, say) are freed, then the device's cache."""
    gc.collect()
    if torch.cuda.is_available():
        try:
            torch.cuda.empty_cache()
        except RuntimeError as exc:  # a broken context: the next pass says so, and is fatal
            log.error("could not release the device's cached memory", error=str(exc))
