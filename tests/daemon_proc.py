"""The daemon as a subprocess, the way systemd runs it: config file, signals, sd_notify."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from tests.conftest import ROOT, free_port


def write_config(
    tmp_path: Path, broker_port: int, model: Path, extra: str = ""
) -> tuple[Path, str]:
    """A config file in `tmp_path` (rules in ./rules, journal in ./var); `extra` is TOML
    appended to it (whole sections)."""
    http = f"127.0.0.1:{free_port()}"
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    config = tmp_path / "secondlook.toml"
    config.write_text(
        f"""
[mqtt]
port = {broker_port}
client_id = "cli-test-{tmp_path.name}"
status_topic = "cli/{tmp_path.name}/status"
[http]
listen = "{http}"
[model]
path = "{model}"
[rules]
dir = "rules"
[storage]
dir = "var"
"""
        + extra
    )
    return config, http


class Notifications:
    """A NOTIFY_SOCKET like systemd's, collecting what the daemon sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.received: list[str] = []

    def read(self) -> list[str]:
        while True:
            try:
                self.received.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.received


async def wait_http_ok(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "daemon exited during start-up"
            try:
                async with session.get(f"{url}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError("daemon never became healthy")


def log_path(config: Path) -> Path:
    """Where `start` writes the daemon's output (a file: a pipe nobody reads fills up)."""
    return config.parent / "daemon.log"


def start(
    config: Path, notify: Notifications | None = None, **env_vars: str
) -> subprocess.Popen[bytes]:
    """`secondlook run --config CONFIG`, its output appended to `log_path(config)`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **env_vars}
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify.path)
    with log_path(config).open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--config", str(config)],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def run_to_exit(
    config: Path, timeout: float = 60, **env_vars: str
) -> subprocess.CompletedProcess[str]:
    """`secondlook run --config CONFIG` expected to stop by itself (a start-up error)."""
    return subprocess.run(
        [sys.executable, "-m", "daemon", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env={**os.environ, **env_vars},
    )
