"""Backend `transformers`: a local Qwen2-VL-family model, micro-batched on its own thread
(or in its own process, `[model] worker = "process"`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

from daemon.config import ModelSettings
from daemon.hookspecs import hookimpl
from daemon.inference.batcher import MicroBatcher
from daemon.inference.model_process import ModelProcess, how_it_ended
from daemon.inference.runner import ModelRunner, choice_token_ids
from daemon.plugin_api import Answer, ModelRequest

log = structlog.get_logger(__name__)

#: at close, how long a model pass under way is waited for
CLOSE_WAIT_S = 5.0


class TransformersBackend:
    """Loads the model once (then a warm-up pass); batches requests for it."""

    applies_adapters = True

    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings
        self.model_name = settings.display_name
        self._model_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._prep_pool = ThreadPoolExecutor(os.cpu_count(), thread_name_prefix="collate")
        self._runner: ModelRunner | ModelProcess | None = None
        self._batcher: MicroBatcher | None = None
        self._batching: asyncio.Task[None] | None = None
        #: the model process while it loads (a stop then ends it)
        self._loading: Any = None

    @property
    def image_factor(self) -> int:
        return self._require_runner().image_factor

    def _require_runner(self) -> ModelRunner | ModelProcess:
        if self._runner is None:
            raise RuntimeError("the model is not loaded yet")
        return self._runner

    def check_choices(self, choices: Mapping[str, Sequence[str]]) -> None:
        """Raise ValueError if two answers share every first token (see choice_token_ids)."""
        choice_token_ids(self._require_runner().tokenizer, choices)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        runner: ModelRunner | ModelProcess
        if self.settings.worker == "process":
            # loads and warms up in the child
            runner = await loop.run_in_executor(
                self._model_pool, ModelProcess.start, self.settings, self._spawned
            )
        else:
            runner = await loop.run_in_executor(self._model_pool, ModelRunner.load, self.settings)
            if self.settings.warmup:
                await loop.run_in_executor(self._model_pool, runner.warm_up)
        self._runner = runner
        self._batcher = MicroBatcher(
            runner,
            max_batch=self.settings.max_batch,
            max_wait_s=self.settings.max_wait_ms / 1000,
            model_pool=self._model_pool,
            prep_pool=self._prep_pool,
        )
        self._batching = asyncio.create_task(self._batcher.run())

    def _spawned(self, process: Any) -> None:
        self._loading = process

    async def run(self, request: ModelRequest) -> Answer:
        if self._batcher is None:
            raise RuntimeError("the model is not loaded yet")
        return await self._batcher.submit(request)

    def health(self) -> dict[str, Any]:
        if self._batcher is None:
            return {"state": "loading"}
        if isinstance(self._runner, ModelProcess) and not self._batcher.health.fatal:
            process = self._runner.process
            if not process.is_alive():  # seen now, not at the next pass
                fatal = f"the model process ended ({how_it_ended(process.exitcode)})"
                self._batcher.health.fatal = fatal
                log.critical("the model is unusable", error=fatal)
        batching = self._batching
        ended = batching is not None and batching.done() and not batching.cancelled()
        if ended and not self._batcher.health.fatal:
            # the batcher's loop ended of itself (a bug): requests would wait for ever
            self._batcher.health.fatal = (
                f"the model's batching loop ended: {batching.exception()!r}"
            )
            log.critical("the model is unusable", error=self._batcher.health.fatal)
        report = self._batcher.report()
        if isinstance(self._runner, ModelProcess):
            report["pid"] = self._runner.process.pid
        return report

    async def close(self) -> None:
        if self._runner is None and self._loading is not None and self._loading.is_alive():
            # a stop while the model process loads: it must not load on without us
            self._loading.kill()
            await asyncio.to_thread(self._loading.join, CLOSE_WAIT_S)
        if self._batching is not None:
            self._batching.cancel()
            await asyncio.gather(self._batching, return_exceptions=True)
        for pool in (self._prep_pool, self._model_pool):
            # a pass that hangs (a stuck device) is left behind: the process exits without it
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True),
                    CLOSE_WAIT_S,
                )
        if isinstance(self._runner, ModelProcess):
            await asyncio.to_thread(self._runner.close)


@hookimpl
def register_backends(register):
    register("transformers", TransformersBackend)
