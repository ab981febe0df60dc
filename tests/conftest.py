"""Shared fixtures: a real mosquitto on a free port, tiny offline models, a running daemon."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import io
import json
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import aiomqtt
import pytest
import structlog
from aiohttp import web
from PIL import Image
from yarl import URL

from daemon.app import Daemon
from daemon.config import Settings
from daemon.contract import Verdict, utc_now
from daemon.hookspecs import hookimpl
from daemon.inference.synthetic import build_tiny_model
from daemon.inference.transformers_backend import TransformersBackend
from daemon.plugin_api import ModelRequest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_alerts"
RULES = ROOT / "rules"


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """Commands run in-process (CliRunner) configure structlog globally: undo it after each test."""
    yield
    structlog.reset_defaults()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


class Broker:
    """A mosquitto of our own: free port, persistence on, restartable on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.config = workdir / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            f"log_dest file {workdir}/mosquitto.log\n"
            "max_queued_messages 10000\n"
            # stay the user we are (as root, mosquitto would switch to a user that cannot
            # write into pytest's private temporary directory)
            f"user {getpass.getuser()}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([binary, "-c", str(self.config)])
        _wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("mosquitto"))
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random models of each family, built once per session."""
    base = tmp_path_factory.mktemp("models")
    return {
        family: build_tiny_model(base / family, family)
        for family in ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
    }


@pytest.fixture
def tiny_model(model_dirs: dict[str, Path]) -> Path:
    return model_dirs["qwen2-vl"]


def jpeg_bytes(
    size: tuple[int, int] = (640, 360), colour: tuple[int, int, int] = (200, 80, 30)
) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def make_verdict(alert_id: str, verdict: str = "confirmed", confidence: float = 0.9) -> Verdict:
    """A verdict of the rule `fire` on an alert of `box-t`, as the pipeline would plan it."""
    return Verdict.model_validate(
        {
            "alert_id": alert_id,
            "box_id": "box-t",
            "camera_id": "cam-1",
            "event_type": "fire",
            "occurred_at": "2026-11-20T14:03:12+08:00",
            "site": None,
            "rule": "fire",
            "verdict": verdict,
            "confidence": confidence,
            "reason": "",
            "model": "m",
            "received_at": utc_now().isoformat(),
            "reviewed_at": utc_now().isoformat(),
            "latency_ms": 1,
        }
    )


def make_alert(alert_id: str | None = None, **fields: Any) -> dict[str, Any]:
    import base64

    alert = {
        "alert_id": alert_id or f"t-{uuid.uuid4().hex[:8]}",
        "box_id": "box-t",
        "camera_id": "cam-1",
        "event_type": "fire",
        "occurred_at": "2026-11-20T14:03:12+08:00",
        "image": base64.b64encode(jpeg_bytes()).decode(),
        "site": "plant-test",
    }
    alert.update(fields)
    return alert


FIRE_RULE = """
description = "test fire rule"
[match]
event_types = ["fire"]
[review]
kind = "verdict"
prompt = "Is there a real open flame? Answer yes or no."
"""

CLASSIFY_RULE = """
[match]
event_types = ["fighting"]
[review]
kind = "classify"
prompt = "What do the people do? Answer fight or play."
labels = ["fight", "play"]
confirm = ["fight"]
reject = ["play"]
"""

EXTRACT_RULE = """
[match]
event_types = ["people_gathering"]
[review]
kind = "extract"
prompt = "Count the people."
max_new_tokens = 24
[review.fields]
people = { type = "integer", description = "number of people visible" }
"""


def make_settings(
    tmp_path: Path,
    *,
    broker: Broker | None,
    model: Path,
    rules_dir: Path | None = None,
    **sections: Any,
) -> Settings:
    rules_dir = rules_dir or tmp_path / "rules"
    rules_dir.mkdir(exist_ok=True)
    data: dict[str, Any] = {
        "mqtt": {
            "enabled": broker is not None,
            "port": broker.port if broker else 1883,
            "client_id": f"secondlook-test-{uuid.uuid4().hex[:8]}",
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 0.5,
        },
        "http": {"listen": f"127.0.0.1:{free_port()}"},
        "model": {"path": str(model)},
        "rules": {"dir": str(rules_dir)},
        "storage": {"dir": str(tmp_path / "var")},
        "log": {"format": "json"},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return Settings.model_validate(data)


@dataclass
class RunningDaemon:
    daemon: Daemon
    settings: Settings
    stop: asyncio.Event
    task: asyncio.Task[None]
    http: aiohttp.ClientSession

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.http.listen}"

    async def post_alert(self, alert: dict[str, Any] | bytes) -> tuple[int, dict[str, Any]]:
        data = alert if isinstance(alert, bytes) else json.dumps(alert).encode()
        async with self.http.post(
            f"{self.base_url}/v1/alerts", data=data, headers={"Content-Type": "application/json"}
        ) as response:
            return response.status, await response.json()

    async def get_alert(self, alert_id: str, **params: str) -> tuple[int, dict[str, Any]]:
        # any id: "..", "/" and "?" too
        url = URL(f"{self.base_url}/v1/alerts/{quote(alert_id, safe='')}", encoded=True)
        async with self.http.get(url.with_query(params)) as response:
            return response.status, await response.json()

    async def wait_reviewed(self, alert_id: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, body = await self.get_alert(alert_id)
            if status == 200 and body["state"] == "reviewed":
                return body
            await asyncio.sleep(0.05)
        raise TimeoutError(f"alert {alert_id} not reviewed within {timeout}s")

    async def shutdown(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 30)


@contextlib.asynccontextmanager
async def run_daemon(settings: Settings, **kwargs: Any) -> AsyncIterator[RunningDaemon]:
    """Start a daemon in this event loop; stop it (in stages, as on SIGTERM) on exit."""
    daemon = Daemon(settings, **kwargs)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    ready = asyncio.create_task(daemon.ready.wait())
    await asyncio.wait({task, ready}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raises the startup error
    assert daemon.ready.is_set(), "daemon did not become ready"
    async with aiohttp.ClientSession() as http:
        running = RunningDaemon(daemon, settings, stop, task, http)
        try:
            yield running
        finally:
            if not task.done():
                await running.shutdown()


@dataclass
class Collector:
    """An independent MQTT client that records every message on its topics."""

    broker: Broker
    topics: list[str]
    messages: list[tuple[str, bytes, bool]] = field(default_factory=list)
    client_id: str = field(default_factory=lambda: f"collector-{uuid.uuid4().hex[:8]}")
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def verdicts(self, prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
        return [
            (topic, json.loads(payload))
            for topic, payload, _ in self.messages
            if topic.startswith(prefix) and payload.startswith(b"{")
        ]

    async def wait_for(self, count: int, prefix: str = "", timeout: float = 30.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while len(self.verdicts(prefix)) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{len(self.verdicts(prefix))} of {count} messages arrived")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        return self.verdicts(prefix)

    async def wait_until(self, topic: str, payload: bytes, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not any(m[:2] == (topic, payload) for m in self.messages):
                self._arrived.clear()
                await self._arrived.wait()

    async def run(self, subscribed: asyncio.Event) -> None:
        """Persistent session: survives broker restarts without losing queued messages."""
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", self.broker.port, identifier=self.client_id, clean_session=False
                ) as client:
                    for topic in self.topics:
                        await client.subscribe(topic, qos=1)
                    subscribed.set()
                    async for message in client.messages:
                        payload = message.payload
                        assert isinstance(payload, bytes)
                        self.messages.append((str(message.topic), payload, message.retain))
                        self._arrived.set()
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def collect(broker: Broker, *topics: str) -> AsyncIterator[Collector]:
    collector = Collector(broker, list(topics))
    subscribed = asyncio.Event()
    task = asyncio.create_task(collector.run(subscribed))
    await asyncio.wait_for(subscribed.wait(), 10)
    try:
        yield collector
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def publish(broker: Broker, topic: str, payload: bytes | str) -> None:
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.publish(topic, payload, qos=1)


class RecordingBackend(TransformersBackend):
    """The real transformers backend, also recording every request it answers."""

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.requests: list[ModelRequest] = []

    async def run(self, request: ModelRequest) -> Any:
        self.requests.append(request)
        return await super().run(request)


class RecordingPlugin:
    @hookimpl
    def register_backends(self, register):
        register("recording", RecordingBackend)


def recording(settings: Settings) -> dict[str, Any]:
    """Daemon arguments and settings that use the recording backend."""
    model = settings.model.model_copy(update={"backend": "recording"})
    return {
        "settings": settings.model_copy(update={"model": model}),
        "extra_plugins": [RecordingPlugin()],
    }


@contextlib.asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Serve an aiohttp app on a free local port; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A broker of this test's own, free to be stopped and restarted."""
    b = Broker(tmp_path_factory.mktemp("own-mosquitto"))
    b.start()
    yield b
    b.stop()
