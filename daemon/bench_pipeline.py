"""`secondlook bench --backend instant`: the whole pipeline but the model, through a broker.

A private mosquitto on a free port, the daemon in this process with the `instant` backend, a
publisher in another process sending N canonical alerts with JPEG snapshots at QoS 1, and a
subscriber here counting verdicts. Reports alerts per second end to end and where the time
goes per stage.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from daemon.app import Daemon
from daemon.config import Settings
from daemon.mqtt import count_messages

RULE = """
[match]
event_types = ["fire"]
[review]
kind = "verdict"
prompt = "Is there a real open flame? Answer yes or no."
"""

#: the publisher runs in a process of its own, as a box would
PUBLISHER = """
import asyncio, json, logging, sys
from daemon.mqtt import publish_all
logging.getLogger("mqtt").setLevel(logging.ERROR)
payloads = json.load(open(sys.argv[2]))
asyncio.run(publish_all("127.0.0.1", int(sys.argv[1]), "secondlook/alerts/bench", payloads))
"""


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


def alert_payloads(count: int, jpegs: list[bytes]) -> list[str]:
    images = [base64.b64encode(jpeg).decode() for jpeg in jpegs]
    return [
        json.dumps(
            {
                "alert_id": f"bench-{i}",
                "box_id": f"box-{i % 7}",
                "camera_id": f"cam-{i % 13}",
                "event_type": "fire",
                "occurred_at": "2026-11-20T14:03:12+08:00",
                "image": images[i % len(images)],
                "boxes": [{"x1": 100, "y1": 100, "x2": 300, "y2": 280, "label": "fire"}],
                "score": 0.8,
            }
        )
        for i in range(count)
    ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_broker(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
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
    raise RuntimeError("mosquitto did not start")


async def run_pipeline_bench(
    alerts: int, image_size: tuple[int, int], progress: Any = None
) -> dict[str, Any]:
    """Publish `alerts` alerts and wait for their verdicts; return the figures."""
    with tempfile.TemporaryDirectory(prefix="secondlook-bench-") as scratch:
        work = Path(scratch)
        (work / "rules").mkdir()
        (work / "rules" / "fire.toml").write_text(RULE)
        broker, port = _start_broker(work)
        try:
            return await _measure(work, port, alerts, image_size, progress)
        finally:
            broker.terminate()
            broker.wait(10)


async def _measure(
    work: Path, port: int, alerts: int, image_size: tuple[int, int], progress: Any
) -> dict[str, Any]:
    payloads = alert_payloads(alerts, synthetic_jpegs(8, image_size))
    (work / "payloads.json").write_text(json.dumps(payloads))
    settings = Settings.model_validate(
        {
            "mqtt": {"port": port, "client_id": "secondlook-bench"},
            "http": {"enabled": False},
            "model": {"backend": "instant"},
            "rules": {"dir": str(work / "rules")},
            "storage": {"dir": str(work / "var")},
            "log": {"level": "warning"},
        }
    )
    daemon = Daemon(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    await asyncio.wait_for(daemon.ready.wait(), 60)
    received = 0
    done = asyncio.Event()

    def on_verdict() -> None:
        nonlocal received
        received += 1
        if progress is not None:
            progress(received)
        if received >= alerts:
            done.set()

    subscribed = asyncio.Event()
    counter = asyncio.create_task(
        count_messages("127.0.0.1", port, "secondlook/verdicts/#", alerts, on_verdict, subscribed)
    )
    await subscribed.wait()
    start = time.perf_counter()
    cpu_start = resource.getrusage(resource.RUSAGE_SELF)
    publisher = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PUBLISHER, str(port), str(work / "payloads.json")
    )
    await asyncio.wait_for(done.wait(), timeout=max(120, alerts / 20))
    elapsed = time.perf_counter() - start
    cpu_end = resource.getrusage(resource.RUSAGE_SELF)
    daemon_cpu = (cpu_end.ru_utime - cpu_start.ru_utime) + (cpu_end.ru_stime - cpu_start.ru_stime)
    await publisher.wait()
    stop.set()
    await task
    counter.cancel()
    return {
        "alerts": alerts,
        "image_size": f"{image_size[0]}x{image_size[1]}",
        "jpeg_kb": round(sum(len(p) for p in payloads) / len(payloads) / 1024 * 3 / 4, 1),
        "elapsed_s": round(elapsed, 3),
        "alerts_per_s": round(alerts / elapsed, 1),
        # CPU time of this process (daemon and verdict counter) per alert; the broker and the
        # publisher use the machine's other cycles
        "daemon_cpu_ms_per_alert": round(1000 * daemon_cpu / alerts, 2),
        "stages": daemon.stats.snapshot(),
    }
