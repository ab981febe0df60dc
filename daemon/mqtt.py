"""The MQTT link, in and out: the only module that imports aiomqtt.

- subscribes at QoS 1 and acknowledges each alert (PUBACK) only after the handler returns,
  i.e. after the alert is journalled (paho's manual ack);
- reconnects with capped, jittered exponential backoff and resubscribes every time;
- keeps a retained availability topic: `online` on connect, `offline` by last will or on
  clean shutdown;
- publishes verdicts at QoS 1; `publish` returns once the broker acknowledged.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import aiomqtt
import structlog

from daemon.config import MqttSettings

log = structlog.get_logger(__name__)

ONLINE = b"online"
OFFLINE = b"offline"
PUBLISH_TIMEOUT_S = 10.0


class PublishError(Exception):
    """A publish that the broker did not acknowledge (not connected, timeout, error)."""


#: (topic, payload, alert format of the subscription it arrived on)
MessageHandler = Callable[[str, bytes, str], Awaitable[None]]


def backoff_delays(minimum: float, maximum: float) -> Callable[[], float]:
    """Successive delays: exponential from `minimum`, capped at `maximum`, each jittered
    down by up to half so a fleet of gateways does not reconnect in step."""
    attempt = 0

    def next_delay() -> float:
        nonlocal attempt
        ceiling = min(maximum, minimum * 2**attempt)
        attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    return next_delay


class MqttLink:
    def __init__(
        self,
        settings: MqttSettings,
        on_message: MessageHandler,
        on_connected: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.subscriptions = settings.all_subscriptions()
        self._on_message = on_message
        #: called after every (re)connection, once subscribed
        self.on_connected = on_connected
        self._intake_open = True
        self._client: aiomqtt.Client | None = None
        #: set when the current connection ends; a new event for each connection
        self._lost = asyncio.Event()
        self.connected = asyncio.Event()
        #: set once the first subscription is up
        self.subscribed = asyncio.Event()

    def _make_client(self) -> aiomqtt.Client:
        s = self.settings
        client = aiomqtt.Client(
            s.host,
            s.port,
            identifier=s.client_id,
            clean_session=s.clean_session,
            keepalive=s.keepalive_s,
            will=aiomqtt.Will(s.status_topic, OFFLINE, qos=1, retain=True),
            timeout=10,
        )
        # hold each PUBACK until the alert is journalled (see `_handle`)
        client._client.manual_ack_set(True)
        return client

    async def run(self) -> None:
        """Stay connected until cancelled."""
        s = self.settings
        next_delay = backoff_delays(s.reconnect_min_s, s.reconnect_max_s)
        while True:
            try:
                async with self._make_client() as client:
                    await client.publish(s.status_topic, ONLINE, qos=1, retain=True)
                    for subscription in self.subscriptions:
                        await client.subscribe(subscription.topic, qos=1)
                    self._client = client
                    self._lost = asyncio.Event()
                    self.connected.set()
                    self.subscribed.set()
                    next_delay = backoff_delays(s.reconnect_min_s, s.reconnect_max_s)
                    topics = [subscription.topic for subscription in self.subscriptions]
                    log.info("mqtt connected", host=s.host, port=s.port, subscribed=topics)
                    self.on_connected()
                    async for message in client.messages:
                        await self._handle(client, message)
            except aiomqtt.MqttError as exc:
                error = str(exc)
            finally:
                self._client = None
                self._lost.set()
                self.connected.clear()
            delay = next_delay()
            log.warning("mqtt disconnected", error=error, retry_in_s=round(delay, 2))
            await asyncio.sleep(delay)

    def close_intake(self) -> None:
        """Stop taking alerts; later ones stay unacknowledged, and the broker redelivers them."""
        self._intake_open = False

    async def _handle(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        if not self._intake_open:
            return
        payload = message.payload
        data = payload if isinstance(payload, bytes | bytearray) else str(payload or "").encode()
        fmt = next(
            (sub.format for sub in self.subscriptions if message.topic.matches(sub.topic)),
            self.settings.format,
        )
        try:
            await self._on_message(str(message.topic), bytes(data), fmt)
        except Exception as exc:
            # not journalled: no PUBACK; reconnecting makes the broker deliver it again
            log.exception("alert intake failed", topic=str(message.topic))
            raise aiomqtt.MqttError(f"alert intake failed: {exc}") from exc
        # PUBACK now: the handler journalled the alert (or recorded why it refused it)
        client._client.ack(message.mid, message.qos)

    async def publish(self, topic: str, payload: str | bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the broker's acknowledgement."""
        client, lost = self._client, self._lost
        if client is None:
            raise PublishError("not connected to the broker")
        sending = asyncio.ensure_future(
            client.publish(topic, payload, qos=1, retain=retain, timeout=PUBLISH_TIMEOUT_S)
        )
        dropped = asyncio.ensure_future(lost.wait())
        try:
            await asyncio.wait({sending, dropped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            dropped.cancel()
        if not sending.done():
            # a connection that is gone will never deliver the PUBACK
            sending.cancel()
            raise PublishError("connection lost before the broker acknowledged")
        try:
            sending.result()
        except aiomqtt.MqttError as exc:
            raise PublishError(str(exc)) from exc

    async def announce_offline(self) -> None:
        """Clean shutdown: replace the retained `online` with `offline` (best effort)."""
        try:
            await self.publish(self.settings.status_topic, OFFLINE, retain=True)
        except PublishError as exc:
            log.warning("could not publish offline status", error=str(exc))
