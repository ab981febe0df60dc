"""The pipeline benchmark's load generator: the boxes and the alarm system in one lean process.

It speaks just enough MQTT 3.1.1 over a plain socket (CONNECT, SUBSCRIBE, PUBLISH, PUBACK),
and assembles each alert's PUBLISH packet from pieces encoded once (the base64 snapshots
above all), so that on a machine it shares with the daemon it takes as little of the CPU as
it can: a general-purpose client (aiomqtt) spends about 1 ms per 110 KB alert here, which the
daemon would otherwise lose.

Run as `python -m daemon.bench_load PORT JPEG_DIR COUNT`: it prints the number of distinct
verdicts every `PROGRESS_EVERY`, then one JSON object with `elapsed_s`, `duplicates` and
`cpu_s` (its own CPU time while publishing and counting).
"""

from __future__ import annotations

import base64
import contextlib
import json
import select
import socket
import struct
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path

ALERT_TOPIC = "secondlook/alerts/bench"
VERDICT_TOPICS = "secondlook/verdicts/#"
#: a progress line every this many distinct verdicts
PROGRESS_EVERY = 50
#: alerts published but not yet acknowledged by the broker
WINDOW = 100
IDLE_TIMEOUT_S = 60.0

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def packet(kind: int, flags: int, *body: bytes) -> bytes:
    """One MQTT control packet: fixed header, then the body pieces."""
    size = sum(map(len, body))
    return b"".join((bytes([kind << 4 | flags]), _remaining_length(size), *body))


class AlertPackets:
    """QoS 1 PUBLISH packets of canonical alerts, cycling through the given snapshots."""

    def __init__(self, jpegs: list[bytes]) -> None:
        self._images = [base64.b64encode(jpeg) for jpeg in jpegs]
        self._topic = _string(ALERT_TOPIC)

    def payload(self, i: int) -> bytes:
        head = {
            "alert_id": f"bench-{i}",
            "box_id": f"box-{i % 7}",
            "camera_id": f"cam-{i % 13}",
            "event_type": "fire",
            "occurred_at": "2026-11-20T14:03:12+08:00",
            "boxes": [{"x1": 100, "y1": 100, "x2": 300, "y2": 280, "label": "fire"}],
            "score": 0.8,
        }
        # the small fields through json, the snapshot spliced in as it is (plain base64)
        opening = json.dumps(head)[:-1].encode() + b', "image": "'
        return b"".join((opening, self._images[i % len(self._images)], b'"}'))

    def packet(self, i: int, packet_id: int) -> bytes:
        return packet(PUBLISH, 0b0010, self._topic, struct.pack("!H", packet_id), self.payload(i))


class LeanClient:
    """A blocking MQTT 3.1.1 session on one socket, for the load loop below."""

    def __init__(self, port: int, client_id: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._inbox = bytearray()
        # keep-alive 0: no pings to send, and the broker never drops the session for silence
        # (the boxes' client is idle once every alert is out, while the model works on)
        variable = _string("MQTT") + bytes([4, 0b10]) + struct.pack("!H", 0)
        self.sock.sendall(packet(CONNECT, 0, variable, _string(client_id)))
        kind, _, body = self._expect()
        if kind != CONNACK or body[1] != 0:
            raise ConnectionError(f"the broker refused the connection: {body!r}")

    def subscribe(self, topic: str) -> None:
        self.sock.sendall(packet(SUBSCRIBE, 0b0010, struct.pack("!H", 1), _string(topic), b"\x01"))
        kind, _, body = self._expect()
        if kind != SUBACK or body[-1] & 0x80:
            raise ConnectionError(f"the broker refused the subscription to {topic}")

    def _expect(self) -> tuple[int, int, bytes]:
        while True:
            for found in self.packets():
                return found
            self.receive()

    def receive(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("the broker closed the connection")
        self._inbox += data

    def packets(self) -> list[tuple[int, int, bytes]]:
        """Every whole packet received so far: (type, flags, body)."""
        return take_packets(self._inbox)


def take_packets(inbox: bytearray) -> list[tuple[int, int, bytes]]:
    """Remove every whole MQTT packet from the front of `inbox`: (type, flags, body) each;
    a packet still arriving stays."""
    found, start = [], 0
    while len(inbox) - start >= 2:
        size, shift, at = 0, 0, start + 1
        while at < len(inbox):
            byte = inbox[at]
            size |= (byte & 0x7F) << shift
            shift += 7
            at += 1
            if not byte & 0x80:
                break
        if inbox[at - 1] & 0x80 or len(inbox) - at < size:
            break  # the rest of this packet has not arrived yet
        found.append((inbox[start] >> 4, inbox[start] & 0x0F, bytes(inbox[at : at + size])))
        start = at + size
    del inbox[:start]
    return found


def run_load(
    port: int, jpegs: list[bytes], count: int, progress: Callable[[int], None]
) -> dict[str, float | int]:
    """Publish `count` alerts (at most WINDOW unacknowledged) while counting the verdicts by
    alert id, until each alert has one."""
    follower = LeanClient(port, "secondlook-bench-alarms")
    follower.subscribe(VERDICT_TOPICS)
    box = LeanClient(port, "secondlook-bench-boxes")
    box.sock.setblocking(False)
    follower.sock.setblocking(False)
    alerts = AlertPackets(jpegs)
    seen: Counter[str] = Counter()
    outgoing: deque[memoryview] = deque()
    published = unacknowledged = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    progress(0)  # publishing starts: the daemon's CPU is counted from here
    while len(seen) < count:
        while unacknowledged < WINDOW and published < count:
            outgoing.append(memoryview(alerts.packet(published, published % 65535 + 1)))
            published += 1
            unacknowledged += 1
        writers = [box.sock] if outgoing else []
        readable, writable, _ = select.select(
            [box.sock, follower.sock], writers, [], IDLE_TIMEOUT_S
        )
        if not readable and not writable:
            raise TimeoutError(f"no verdict for {IDLE_TIMEOUT_S:.0f} s ({len(seen)} of {count})")
        if writable:
            _send_some(box.sock, outgoing)
        if box.sock in readable:
            box.receive()
            unacknowledged -= sum(kind == PUBACK for kind, _, _ in box.packets())
        if follower.sock in readable:
            follower.receive()
            _count_verdicts(follower, seen, count, progress)
    return {
        "elapsed_s": time.perf_counter() - started,
        "duplicates": sum(seen.values()) - len(seen),
        "cpu_s": time.process_time() - cpu_started,
    }


def _send_some(sock: socket.socket, outgoing: deque[memoryview]) -> None:
    """Write as much of the queued packets as the socket takes now."""
    while outgoing:
        try:
            sent = sock.send(outgoing[0])
        except BlockingIOError:
            return
        if sent < len(outgoing[0]):
            outgoing[0] = outgoing[0][sent:]
            return
        outgoing.popleft()


def _count_verdicts(
    follower: LeanClient, seen: Counter[str], count: int, progress: Callable[[int], None]
) -> None:
    acks = []
    for kind, flags, body in follower.packets():
        if kind != PUBLISH:
            continue
        topic_end = 2 + struct.unpack_from("!H", body)[0]
        if flags & 0b0110:  # QoS 1: a packet id, then acknowledge it
            acks.append(packet(PUBACK, 0, body[topic_end : topic_end + 2]))
            topic_end += 2
        seen[json.loads(body[topic_end:])["alert_id"]] += 1
        if len(seen) % PROGRESS_EVERY == 0 or len(seen) == count:
            progress(len(seen))
    if acks:
        follower.sock.setblocking(True)
        follower.sock.sendall(b"".join(acks))
        follower.sock.setblocking(False)


def main() -> None:
    port, folder, count = int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    jpegs = [path.read_bytes() for path in sorted(folder.glob("*.jpg"))]
    figures = run_load(port, jpegs, count, lambda n: print(n, flush=True))
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    # Ctrl-C reaches the bench and this process alike: the bench reports, this one goes quietly
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        main()
