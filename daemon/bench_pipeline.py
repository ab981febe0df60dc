"""`secondlook bench --backend instant`: the whole pipeline but the model, through a broker
(`--backend pipeline`: the whole pipeline with a model).

A private mosquitto on a free port, the daemon in this process with the `instant` backend
(or the model's settings given), and a lean load generator in a process of its own
(`daemon.bench_load`, as the boxes and the alarm system would be) that publishes N
canonical alerts with JPEG snapshots at QoS 1 and counts the verdicts. Reports alerts per
second end to end, the wall time per stage, and where the CPU time goes: per thread of the
daemon (event loop, image preparation, journal writer and reader), the broker and the load
generator.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from PIL import Image, ImageDraw

from daemon.app import Daemon
from daemon.config import Settings

RULE = """
[match]
event_types = ["fire"]
[review]
kind = "verdict"
prompt = "Is there a real open flame? Answer yes or no."
"""

#: daemon threads by name prefix, for the CPU breakdown
THREAD_ROLES = {
    "MainThread": "event_loop",
    "prepare": "image_prep",
    "journal-writer": "journal_writer",
    # with a model (`--backend pipeline`)
    "model": "model_thread",
    "collate": "collate",
}


def synthetic_jpegs(count: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    """Distinct camera-like snapshots: a gradient scene with shapes and a little sensor noise
    (about 100 KB at 1280x720, as a camera's JPEG snapshot)."""
    rng = random.Random(seed)
    jpegs = []
    noise = Image.effect_noise(size, 12).convert("RGB")
    for _ in range(count):
        scene = Image.linear_gradient("L").resize(size).convert("RGB")
        image = Image.blend(scene, noise, 0.25)
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x, y = rng.randrange(size[0]), rng.randrange(size[1])
            w, h = rng.randrange(40, 300), rng.randrange(40, 300)
            colour = tuple(rng.randrange(256) for _ in range(3))
            draw.rectangle((x, y, x + w, y + h), fill=colour)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        jpegs.append(buffer.getvalue())
    return jpegs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_broker(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).is_file():
        raise click.ClickException(
            "this bench runs a private mosquitto, and none is installed (apt-get install mosquitto)"
        )
    port = _free_port()
    config = workdir / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n"
        "max_inflight_messages 0\n"
    )
    proc = subprocess.Popen([binary, "-c", str(config)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise click.ClickException(f"mosquitto ({binary}) did not start within 10 s")


async def run_pipeline_bench(
    alerts: int,
    image_size: tuple[int, int],
    progress: Callable[[int], None] | None = None,
    model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Publish `alerts` alerts and wait for their verdicts; return the figures. `model`: the
    `[model]` settings (default: the instant backend)."""
    with tempfile.TemporaryDirectory(prefix="secondlook-bench-") as scratch:
        work = Path(scratch)
        (work / "rules").mkdir()
        (work / "rules" / "fire.toml").write_text(RULE)
        broker, port = _start_broker(work)
        try:
            return await _measure(
                work, broker, port, alerts, image_size, progress, model or {"backend": "instant"}
            )
        finally:
            broker.terminate()
            broker.wait(10)


async def _measure(
    work: Path,
    broker: subprocess.Popen[bytes],
    port: int,
    alerts: int,
    image_size: tuple[int, int],
    progress: Callable[[int], None] | None,
    model: dict[str, Any],
) -> dict[str, Any]:
    snapshots = synthetic_jpegs(8, image_size)
    jpegs = work / "jpegs"
    jpegs.mkdir()
    for i, jpeg in enumerate(snapshots):
        (jpegs / f"{i}.jpg").write_bytes(jpeg)
    settings = Settings.model_validate(
        {
            "mqtt": {"port": port, "client_id": "secondlook-bench"},
            "http": {"enabled": False},
            "model": model,
            "rules": {"dir": str(work / "rules")},
            "storage": {"dir": str(work / "var")},
            # interrupted, the bench ends soon: its journal is thrown away
            "pipeline": {"stop_grace_s": 1},
            "log": {"level": "warning"},
        }
    )
    daemon = Daemon(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        return await _drive(
            daemon, task, stop, broker, port, jpegs, snapshots, image_size, alerts, progress
        )
    finally:
        # also when interrupted: the daemon shuts down, its journal and threads close
        stop.set()
        with contextlib.suppress(Exception):
            await task


async def _drive(
    daemon: Daemon,
    task: asyncio.Task[None],
    stop: asyncio.Event,
    broker: subprocess.Popen[bytes],
    port: int,
    jpegs: Path,
    snapshots: list[bytes],
    image_size: tuple[int, int],
    alerts: int,
    progress: Callable[[int], None] | None,
) -> dict[str, Any]:
    """Wait for the daemon, run the load generator, and gather the figures."""
    settings = daemon.settings
    ready = asyncio.ensure_future(daemon.ready.wait())
    await asyncio.wait({ready, task}, timeout=READY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        ready.cancel()
        if task.done():
            task.result()  # the daemon's own failure (a model that cannot load, say)
        raise TimeoutError(f"the daemon was not ready within {READY_TIMEOUT_S:g} s")
    # a model process (`[model] worker = "process"`): its CPU time is counted too
    model_pid = getattr(daemon.backend, "health", dict)().get("pid")
    generator = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daemon.bench_load",
        str(port),
        str(jpegs),
        str(alerts),
        stdout=asyncio.subprocess.PIPE,
    )
    assert generator.stdout is not None
    cpu_before: dict[str, float] = {}
    broker_before = model_before = 0.0
    figures: dict[str, Any] = {}
    try:
        # no deadline of its own: the generator ends (without figures) once no verdict came
        # for IDLE_TIMEOUT_S, however slow the model
        while line := await generator.stdout.readline():
            if line.startswith(b"{"):
                figures = json.loads(line)
                break
            if not cpu_before:  # the generator's first line: it starts publishing
                cpu_before, broker_before = thread_cpu_s(), process_cpu_s(broker.pid)
                model_before = process_cpu_s(model_pid) if model_pid else 0.0
            if progress is not None:
                progress(int(line))
        cpu = thread_cpu_s()
        broker_cpu = process_cpu_s(broker.pid) - broker_before
        model_cpu = process_cpu_s(model_pid) - model_before if model_pid else None
        await generator.wait()
    finally:
        if generator.returncode is None:
            generator.kill()
            await generator.wait()
    stop.set()  # the daemon's shutdown completes what it counts (the last PUBACKs)
    await task
    if not figures:  # its error (no verdict for a while, say) is on stderr above
        raise click.ClickException(
            "the load generator ended without its figures (see its error above)"
        )
    per_alert = {
        role: 1000 * (seconds - cpu_before.get(role, 0.0)) / alerts for role, seconds in cpu.items()
    }
    per_alert["broker"] = 1000 * broker_cpu / alerts
    if model_cpu is not None:
        per_alert["model_process"] = 1000 * model_cpu / alerts
    per_alert["load_generator"] = 1000 * figures["cpu_s"] / alerts
    cores = os.cpu_count() or 1
    all_ms = sum(per_alert.values())
    rate = alerts / figures["elapsed_s"]
    with_model = settings.model.backend != "instant"
    return {
        "backend": settings.model.backend,
        "model": settings.model.display_name if with_model else None,
        "worker": settings.model.worker if with_model else None,
        "alerts": alerts,
        "image_size": f"{image_size[0]}x{image_size[1]}",
        "jpeg_kb": round(sum(map(len, snapshots)) / len(snapshots) / 1024, 1),
        "elapsed_s": round(figures["elapsed_s"], 3),
        "alerts_per_s": round(rate, 1),
        "duplicates": figures["duplicates"],
        # CPU time of the daemon's threads per alert (from its first verdicts to its last)
        "daemon_cpu_ms_per_alert": round(sum(per_alert[role] for role in cpu), 2),
        "cpu_ms_per_alert": {role: round(ms, 3) for role, ms in per_alert.items()},
        "cores": cores,
        # every process's CPU per alert against the cores: how busy they were, and the rate
        # at which they would all be busy (what no scheduling could go past)
        "cpu_busy_pct": round(100 * rate * all_ms / 1000 / cores, 1),
        "cpu_bound_alerts_per_s": round(1000 * cores / all_ms, 1),
        "stages": daemon.stats.snapshot(),
    }


#: how long the daemon may take to start (a full-size model loads and warms up)
READY_TIMEOUT_S = 600.0


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds of this process's threads so far, summed by role (Linux; else one
    figure for the whole process)."""
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    roles: dict[str, float] = {}
    try:
        tasks = [path.name for path in Path("/proc/self/task").iterdir()]
    except OSError:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {"other": usage.ru_utime + usage.ru_stime}
    for tid in tasks:
        name = names.get(int(tid), "")
        role = next((r for prefix, r in THREAD_ROLES.items() if name.startswith(prefix)), None)
        if role is None:
            role = "journal_reader" if "_connection_worker_thread" in name else "other"
        roles[role] = roles.get(role, 0.0) + _ticks_s(f"/proc/self/task/{tid}/stat")
    return roles


def process_cpu_s(pid: int) -> float:
    """CPU seconds of another process so far (0 where /proc is not there)."""
    return _ticks_s(f"/proc/{pid}/stat")


def _ticks_s(stat_path: str) -> float:
    try:
        fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime and stime, the 14th and 15th fields, in clock ticks
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
