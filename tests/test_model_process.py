"""`[model] worker = "process"`: the model in a child process, as the daemon runs it."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
import types
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import aiohttp
import pytest
import torch
from PIL import Image

from daemon.config import ModelSettings
from daemon.inference import model_process
from daemon.inference.model_process import ReceiveBlocks, SendBlocks, portable
from daemon.inference.transformers_backend import TransformersBackend
from daemon.plugin_api import (
    ChoiceAnswer,
    ChoiceQuery,
    GenerateQuery,
    ModelLoadError,
    ModelRequest,
)
from tests.conftest import FIRE_RULE, collect, make_alert
from tests.daemon_proc import log_path, start, wait_http_ok, write_config
from tests.test_lifecycle import alert_state, log_events, post

FIRE = ChoiceQuery("Is there fire? Answer yes or no.", {"yes": ["yes"], "no": ["no"]})


def mixed_requests() -> list[ModelRequest]:
    """Choice requests on images of three sizes, and generate requests."""
    choice = [
        ModelRequest(FIRE, [Image.new("RGB", (56 + 28 * (i % 3), 56), (i * 30, 90, 0))])
        for i in range(6)
    ]
    describe = GenerateQuery("Describe the scene.", max_new_tokens=6)
    generate = [
        ModelRequest(describe, [Image.new("RGB", (56, 84), (0, i * 40, 9))]) for i in range(3)
    ]
    return choice + generate


async def answers_of(backend: TransformersBackend, requests: list[ModelRequest]) -> list:
    await backend.start()
    try:
        return await asyncio.gather(*(backend.run(request) for request in requests))
    finally:
        await backend.close()


async def test_the_model_process_answers_as_the_model_thread_does(tiny_model):
    requests = mixed_requests()
    settings = ModelSettings(path=str(tiny_model), max_new_tokens=8, max_wait_ms=200)
    alone = await answers_of(TransformersBackend(settings), requests)
    process = TransformersBackend(settings.model_copy(update={"worker": "process"}))
    apart = await answers_of(process, requests)
    for ours, theirs in zip(apart, alone, strict=True):
        if isinstance(ours, ChoiceAnswer):
            assert ours.probabilities == pytest.approx(theirs.probabilities, abs=1e-5)
        else:
            assert ours == theirs
    assert process.health()["requests"] == len(requests)
    assert not process._runner.process.is_alive()  # closed with the backend
    # the child told the daemon's side the model's context: long requests fail on collation
    assert process._runner.context == 4096


async def test_an_error_in_the_model_process_reaches_the_caller_as_itself(tiny_model):
    backend = TransformersBackend(ModelSettings(path=str(tiny_model), worker="process"))
    await backend.start()
    try:
        runner = backend._runner
        requests = mixed_requests()[-4:]  # a choice request with generate requests
        with pytest.raises(ValueError, match="a batch must hold requests of one kind"):
            await asyncio.to_thread(runner.forward, requests, runner.collate(requests))
        # the child goes on: the next batch is answered
        [answer] = await asyncio.gather(backend.run(mixed_requests()[0]))
        assert set(answer.probabilities) == {"yes", "no"}
    finally:
        await backend.close()


#: a module of the daemon's alone (as a `[plugins] dir` file is): the child cannot import it
PLUGIN_ONLY = types.ModuleType("secondlook_plugin_only_here")


@dataclasses.dataclass(frozen=True)
class TaggedQuery(ChoiceQuery):
    tag: str = "night"


class Prompt(str):
    pass


TaggedQuery.__module__ = Prompt.__module__ = PLUGIN_ONLY.__name__
PLUGIN_ONLY.TaggedQuery, PLUGIN_ONLY.Prompt = TaggedQuery, Prompt


async def test_a_plugins_own_query_types_reach_the_model_process_as_plain_data(
    tiny_model, monkeypatch
):
    monkeypatch.setitem(sys.modules, PLUGIN_ONLY.__name__, PLUGIN_ONLY)
    image = Image.new("RGB", (56, 56), (200, 90, 0))
    odd = [
        TaggedQuery(FIRE.prompt, FIRE.choices),
        ChoiceQuery(Prompt(FIRE.prompt), types.MappingProxyType({"yes": ("yes",), "no": ["no"]})),
    ]
    requests = [ModelRequest(FIRE, [image]), *(ModelRequest(q, [image]) for q in odd)]
    settings = ModelSettings(path=str(tiny_model), max_wait_ms=200)
    alone = await answers_of(TransformersBackend(settings), requests)
    backend = TransformersBackend(settings.model_copy(update={"worker": "process"}))
    await backend.start()
    try:
        apart = await asyncio.gather(*(backend.run(request) for request in requests))
        for ours, theirs in zip(apart, alone, strict=True):
            assert ours.probabilities == pytest.approx(theirs.probabilities, abs=1e-5)
        # and a message the child cannot unpickle fails its pass alone, not the process
        runner = backend._runner
        monkeypatch.setattr(model_process, "without_images", lambda request: request)
        with pytest.raises(ModuleNotFoundError, match="secondlook_plugin_only_here"):
            await asyncio.to_thread(runner.forward, requests[1:2], runner.collate(requests[1:2]))
        monkeypatch.undo()
        [answer] = await asyncio.gather(backend.run(requests[0]))
        assert answer.probabilities == pytest.approx(alone[0].probabilities, abs=1e-5)
    finally:
        await backend.close()


def test_errors_cross_as_themselves_or_as_a_runtime_error_naming_them():
    out_of_memory = portable(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert isinstance(out_of_memory, torch.OutOfMemoryError)  # the batcher still splits

    class Local(Exception):  # not importable by name: cannot be unpickled
        pass

    stand_in = portable(Local("the reason"))
    assert type(stand_in) is RuntimeError and str(stand_in) == "Local: the reason"


def test_large_tensors_cross_in_shared_memory_blocks_that_are_reused_and_freed():
    sender, receiver = SendBlocks(), ReceiveBlocks()

    def batch(patches: int) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": torch.randn(patches, 1176).to(torch.bfloat16),
            "input_ids": torch.arange(12).reshape(2, 6),
            "empty": torch.zeros(0, 3),
        }

    def round_trip(inputs: dict[str, torch.Tensor]) -> str:
        packed = sender.pack(inputs)
        assert packed["input_ids"] is inputs["input_ids"]  # small: through the pipe
        received = receiver.unpack(packed)
        assert torch.equal(received["pixel_values"], inputs["pixel_values"])
        assert received["pixel_values"].dtype == torch.bfloat16
        assert received["empty"].shape == (0, 3)
        return packed["pixel_values"].block

    first = round_trip(batch(700))
    assert round_trip(batch(600)) == first  # fits: the same block again
    larger = round_trip(batch(1400))
    assert larger != first and list(receiver.blocks) == [larger]
    with pytest.raises(FileNotFoundError):  # the outgrown block is unlinked
        SharedMemory(name=first)
    receiver.close()
    sender.close()
    with pytest.raises(FileNotFoundError):
        SharedMemory(name=larger)


async def test_a_model_that_cannot_load_fails_the_start_with_the_reason(tmp_path):
    missing = tmp_path / "no-model-here"
    backend = TransformersBackend(ModelSettings(path=str(missing), worker="process"))
    with pytest.raises(ModelLoadError, match="cannot load model"):
        await backend.start()
    await backend.close()


async def model_pid(http: str) -> int:
    """The model process's pid, as `/healthz` reports it."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{http}/healthz") as response,
    ):
        return (await response.json())["model_worker"]["pid"]


async def test_a_model_process_that_dies_stops_the_daemon_and_its_alert_waits(
    tmp_path, broker, tiny_model
):
    config, http = write_config(tmp_path, broker.port, tiny_model, "")
    text = config.read_text().replace("[model]\n", '[model]\nworker = "process"\n')
    config.write_text(text)
    (tmp_path / "rules" / "fire.toml").write_text(FIRE_RULE)
    async with collect(broker, "secondlook/verdicts/#") as out:
        proc = start(config)
        try:
            await wait_http_ok(f"http://{http}", proc)
            pid = await model_pid(http)
            # systemd signals every process of the service: the child leaves stopping to us
            os.kill(pid, signal.SIGTERM)
            assert await post(http, make_alert("first")) == 202
            [(_, verdict)] = await out.wait_for(1, timeout=60)
            assert verdict["alert_id"] == "first" and verdict["rule"] == "fire"

            # stuck (SIGSTOP) while an alert waits for it, then gone
            os.kill(pid, signal.SIGSTOP)
            assert await post(http, make_alert("orphan")) == 202
            os.kill(pid, signal.SIGKILL)
            # the backend is unusable: a non-zero exit, for systemd's Restart=on-failure
            assert await asyncio.to_thread(proc.wait, 60) == 1
        finally:
            if proc.poll() is None:
                proc.kill()
        assert alert_state(config, "orphan") == "received"
        assert any(
            e["event"] == "the model is unusable"
            and e["error"] == "the model process ended (killed by SIGKILL)"
            for e in log_events(config)
        )

        proc = start(config)
        try:
            [_, (_, verdict)] = await out.wait_for(2, timeout=90)
            assert verdict["alert_id"] == "orphan"
            pid = await model_pid(http)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 30) == 0
    assert alert_state(config, "orphan") == "reviewed"
    with pytest.raises(ProcessLookupError):  # the model process ended with the daemon
        os.kill(pid, 0)
    assert "Traceback" not in log_path(config).read_text()


async def test_a_model_process_that_dies_while_idle_stops_the_daemon(tmp_path, tiny_model):
    config, http = write_config(tmp_path, 1, tiny_model, "")
    text = config.read_text().replace("[mqtt]\n", "[mqtt]\nenabled = false\n")
    config.write_text(text.replace("[model]\n", '[model]\nworker = "process"\n'))
    proc = start(config)
    try:
        await wait_http_ok(f"http://{http}", proc)
        os.kill(
            await model_pid(http), signal.SIGKILL
        )  # the out-of-memory killer, say: no alert needs it now
        assert await asyncio.to_thread(proc.wait, 30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in log_path(config).read_text()


#: in the model process only (spawned children carry --multiprocessing-fork): a slow load
SLOW_LOAD = """
import os, sys, time
if "--multiprocessing-fork" in sys.argv:
    time.sleep(float(os.environ["SECONDLOOK_TEST_SLOW_LOAD_S"]))
"""


def model_processes_of(pid: int) -> list[int]:
    """The children of `pid` that multiprocessing spawned to run `serve` (not its resource
    tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


async def test_a_stop_while_the_model_process_loads_ends_it(tmp_path, tiny_model):
    config, _ = write_config(tmp_path, 1, tiny_model, "")
    text = config.read_text().replace("[mqtt]\n", "[mqtt]\nenabled = false\n")
    config.write_text(text.replace("[model]\n", '[model]\nworker = "process"\n'))
    site = tmp_path / "slowsite"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_LOAD)
    proc = start(config, PYTHONPATH=str(site), SECONDLOOK_TEST_SLOW_LOAD_S="60")
    try:
        async with asyncio.timeout(30):
            while not (loading := model_processes_of(proc.pid)):
                await asyncio.sleep(0.1)
            while "loading model" not in log_path(config).read_text():
                await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    await asyncio.sleep(0.5)
    for pid in loading:  # ended with the daemon, not left loading on its own
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
