"""The model in a process of its own (`[model] worker = "process"`).

In one process the model's thread shares Python's interpreter lock with the event loop and
the image and collation threads. It holds the lock while it dispatches each torch call, so a
pass bound by dispatch, as on a GPU, waits whenever they run Python
(`scripts/gil_contention.py` measures how much). Here the model lives in a child process
started with `spawn`, with a lock of its own. The daemon keeps the processor and collates
batches as before; the large tensors (the image patches) cross in shared memory, the rest
pickled through a pipe. The child adds the M-RoPE positions, runs the pass and sends the
answers back, or the error, which the daemon raises as if the pass had run in its own thread
(an out-of-memory error still splits the batch). A child that ends makes the backend
unusable: the daemon stops and systemd starts it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import pickle
import signal
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import structlog
import torch
from transformers import BatchFeature

from daemon import logs
from daemon.config import LogSettings, ModelSettings
from daemon.inference.processors import load_processor
from daemon.inference.runner import ChoiceIds, ModelRunner, collate_checked, image_factor_of
from daemon.plugin_api import Answer, BackendUnusable, ChoiceQuery, GenerateQuery, ModelRequest

log = structlog.get_logger(__name__)

#: tensors at least this large cross in shared memory, smaller ones in the pipe
SHARED_MIN_BYTES = 1 << 20
#: at close, how long the child is given to finish its pass and exit
CLOSE_WAIT_S = 5.0


@dataclasses.dataclass(frozen=True)
class SharedTensor:
    """Where a tensor lies in shared memory."""

    block: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def _view(block: SharedMemory, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    nbytes = dtype.itemsize * int(torch.Size(shape).numel())
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(block.buf, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)


def _close(block: SharedMemory) -> None:
    # a view still alive (an error's traceback) keeps the mapping until it goes
    with contextlib.suppress(BufferError):
        block.close()


class SendBlocks:
    """The daemon's shared memory blocks, one per tensor name, reused from batch to batch (a
    fresh block costs page faults and zeroed pages on both sides every time); a block too
    small for a batch is replaced by a larger one."""

    def __init__(self) -> None:
        self.blocks: dict[str, SharedMemory] = {}

    def pack(self, inputs: Any) -> dict[str, Any]:
        """Collated inputs to send: the large tensors copied into the blocks. The blocks
        must not be packed into again before the child has answered."""
        packed: dict[str, Any] = {}
        for name, value in dict(inputs).items():
            if isinstance(value, torch.Tensor) and value.nbytes >= SHARED_MIN_BYTES:
                block = self._block(name, value.nbytes)
                _view(block, value.dtype, value.shape).copy_(value)
                packed[name] = SharedTensor(block.name, value.dtype, tuple(value.shape))
            else:
                packed[name] = value
        return packed

    def _block(self, name: str, nbytes: int) -> SharedMemory:
        block = self.blocks.get(name)
        if block is None or block.size < nbytes:
            if block is not None:
                self._drop(block)
            # some room to grow: batch sizes and image counts vary
            block = SharedMemory(create=True, size=nbytes + nbytes // 4)
            self.blocks[name] = block
        return block

    @staticmethod
    def _drop(block: SharedMemory) -> None:
        _close(block)
        block.unlink()  # the child's mapping, if any, lasts until it closes it

    def close(self) -> None:
        for block in self.blocks.values():
            self._drop(block)
        self.blocks.clear()


class ReceiveBlocks:
    """The child's mappings of the daemon's blocks, kept open while the daemon reuses them."""

    def __init__(self) -> None:
        self.blocks: dict[str, SharedMemory] = {}

    def unpack(self, packed: dict[str, Any]) -> BatchFeature:
        """The inputs again, the large tensors as views of the shared blocks."""
        inputs: dict[str, Any] = {}
        names = {value.block for value in packed.values() if isinstance(value, SharedTensor)}
        for gone in set(self.blocks) - names:  # replaced by larger ones
            _close(self.blocks.pop(gone))
        for name, value in packed.items():
            if isinstance(value, SharedTensor):
                if value.block not in self.blocks:
                    self.blocks[value.block] = SharedMemory(name=value.block)
                inputs[name] = _view(self.blocks[value.block], value.dtype, value.shape)
            else:
                inputs[name] = value
        return BatchFeature(inputs)

    def close(self) -> None:
        for block in self.blocks.values():
            _close(block)
        self.blocks.clear()


def portable(error: BaseException) -> BaseException:
    """The error itself if it survives pickling, else a RuntimeError saying what it was."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


def without_images(request: ModelRequest) -> ModelRequest:
    """What the child needs of a request once it is collated: its query and adapter, as
    plain data (a plugin's own query class or mapping, which the child could not import or
    the pipe not carry, must not end the model process)."""
    query = request.query
    plain: ChoiceQuery | GenerateQuery = (
        ChoiceQuery(
            str(query.prompt),
            {str(label): tuple(map(str, forms)) for label, forms in query.choices.items()},
        )
        if isinstance(query, ChoiceQuery)
        else GenerateQuery(str(query.prompt), query.max_new_tokens and int(query.max_new_tokens))
    )
    adapter = None if request.adapter is None else str(request.adapter)
    return ModelRequest(plain, (), adapter)


class ModelProcess:
    """The daemon's side: collates here, runs passes in the child. It offers the batcher
    what a `ModelRunner` does (`collate`, `forward`, `image_factor`, `tokenizer`)."""

    def __init__(
        self,
        process: multiprocessing.process.BaseProcess,
        conn: Connection,
        processor: Any,
        *,
        context: int | None = None,
        max_new_tokens: int = 256,
    ) -> None:
        self.process = process
        self.conn = conn
        self.blocks = SendBlocks()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.choice_ids = ChoiceIds(self.tokenizer)
        self.image_factor = image_factor_of(processor)
        #: the model's context, as the child read it from the model
        self.context = context
        self.max_new_tokens = max_new_tokens

    @classmethod
    def start(
        cls, settings: ModelSettings, on_spawn: Callable[[Any], None] = lambda process: None
    ) -> ModelProcess:
        """Start the child and wait until its model is loaded and warm (blocking: call it
        off the event loop). Raises what the child's loading raised."""
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        process = context.Process(
            target=serve, args=(theirs, settings, logs.configured), name="secondlook-model"
        )
        process.start()
        on_spawn(process)  # the caller can end it while it loads
        theirs.close()  # the child's end: ours reads EOF once the child is gone
        try:
            status, payload = ours.recv()
        except (EOFError, OSError) as exc:
            process.join(CLOSE_WAIT_S)
            raise BackendUnusable(
                f"the model process ended while loading ({how_it_ended(process.exitcode)})"
            ) from exc
        if status == "failed":
            process.join(CLOSE_WAIT_S)
            raise payload
        log.info("model process ready", pid=process.pid)
        # the path is known good now: the child loaded it
        processor = load_processor(settings.path)
        if hasattr(processor, "pixel_dtype"):
            processor.pixel_dtype = payload["dtype"]
        return cls(
            process,
            ours,
            processor,
            context=payload.get("context"),
            max_new_tokens=settings.max_new_tokens,
        )

    def collate(self, requests: Sequence[ModelRequest]) -> Any:
        self.choice_ids.check(requests)
        return collate_checked(self.processor, requests, self.context, self.max_new_tokens)

    def forward(self, requests: Sequence[ModelRequest], inputs: Any) -> list[Answer | Exception]:
        """One pass in the child (blocking, on the model thread)."""
        packed = self.blocks.pack(inputs)
        try:
            self.conn.send(([without_images(request) for request in requests], packed))
            status, payload = self.conn.recv()
        except (EOFError, OSError) as exc:
            self.process.join(CLOSE_WAIT_S)
            raise BackendUnusable(
                f"the model process ended ({how_it_ended(self.process.exitcode)})"
            ) from exc
        if status == "error":
            raise payload
        return list(payload)

    def close(self) -> None:
        """Ask the child to exit; end it if it does not (blocking)."""
        with contextlib.suppress(OSError):  # already gone
            self.conn.send(None)
        self.process.join(CLOSE_WAIT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(CLOSE_WAIT_S)
        self.conn.close()
        self.blocks.close()


def how_it_ended(exitcode: int | None) -> str:
    """A child's exit code in words: a signal by its name (SIGKILL: the out-of-memory killer,
    or kill -9)."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            pass
    return f"exit code {exitcode}"


def serve(conn: Connection, settings: ModelSettings, log_settings: LogSettings) -> None:
    """The child: load and warm up the model, then run passes until the daemon closes."""
    # the daemon decides when this process ends (systemd signals the whole service)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs.configure_logging(log_settings)
    try:
        runner = ModelRunner.load(settings)
        if settings.warmup:
            runner.warm_up()
    except Exception as exc:
        conn.send(("failed", portable(exc)))
        return
    blocks = ReceiveBlocks()
    try:
        conn.send(("ready", {"dtype": runner.model.dtype, "context": runner.context}))
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return  # the daemon is gone
            except Exception as exc:  # read whole, but it does not unpickle here: its pass fails
                conn.send(("error", portable(exc)))
                continue
            if message is None:
                return
            conn.send(run_pass(runner, blocks, *message))
    except (EOFError, OSError):
        return  # the daemon is gone (a stop while loading, or a crash)
    finally:
        blocks.close()


def run_pass(
    runner: ModelRunner,
    blocks: ReceiveBlocks,
    requests: list[ModelRequest],
    packed: dict[str, Any],
) -> tuple[str, Any]:
    """("ok", answers) or ("error", the error)."""
    try:
        inputs = blocks.unpack(packed)
        return "ok", runner.forward(requests, runner.add_positions(requests, inputs))
    except Exception as exc:
        if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        # without its traceback, whose frames hold views into the shared blocks
        return "error", portable(exc.with_traceback(None))
