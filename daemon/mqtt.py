"""The MQTT link, in and out: the only module that imports aiomqtt.

- subscribes at QoS 1 and acknowledges each alert (PUBACK) only after the handler returns,
  i.e. after the alert is journalled (paho's manual ack);
- reconnects with capped, jittered exponential backoff and resubscribes every time;
- keeps a retained availability topic: `online` on connect, `offline` by last will or on
  clean shutdown;
- publishes verdicts at QoS 1; `publish` returns once the broker acknowledged, and raises
  `PublishRefused` when its acknowledgement refuses the message (MQTT 5 reason codes);
- subscribes with MQTT 5's retain handling 1: a retained alert comes with a new subscription
  only, not again at every reconnect (when the journal may have pruned it long ago).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho_mqtt
import structlog
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from daemon.config import MqttSettings, Subscription
from daemon.credentials import CredentialError, credential_path, read_secret
from daemon.plugin_api import parsing_retained

log = structlog.get_logger(__name__)

ONLINE = b"online"
OFFLINE = b"offline"
PUBLISH_TIMEOUT_S = 10.0
#: alerts being journalled at once per connection; the next waits (back-pressure on the broker)
INTAKE_WINDOW = 64
#: ... and at most this many payload bytes among them (big snapshots: fewer at once)
INTAKE_WINDOW_BYTES = 16 * 2**20
#: messages received and not yet taken in, at most, before QoS 0 ones are dropped: the broker
#: holds back QoS 1 alerts past the receive maximum while intake is paused or behind, but
#: sends QoS 0 ones as they come (they would fill memory)
QUEUE_MAX = 4 * INTAKE_WINDOW
#: how often that count is looked at
QUEUE_CHECK_S = 0.25
#: CONNACK codes of a refused login: MQTT 5's bad user name or password, not authorized,
#: banned, bad authentication method; MQTT 3.1.1's 4 and 5 (when not translated)
LOGIN_REFUSED = {134, 135, 138, 140, 4, 5}
TLS_UNUSABLE = "[mqtt] TLS files cannot be used: "


def _raise_if_cancelled() -> None:
    """Honour a cancellation that arrived while connecting: on Python 3.11, asyncio.wait_for
    (which aiomqtt's subscribe and publish use) drops one that comes as its result does, and
    the link would then take alerts in for ever while the daemon stops."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class IntakeFailed(aiomqtt.MqttError):
    """An alert could not be taken in (not journalled, so not acknowledged): the connection
    is dropped so that the broker delivers it again on the next one."""


class PublishError(Exception):
    """A publish that the broker did not acknowledge (not connected, timeout, error)."""


class PublishRefused(PublishError):
    """A publish the broker acknowledged with a failure reason code (MQTT 5): not
    authorized, quota exceeded, topic name invalid ... Sending it again will not help."""


class ConnectionLost(PublishError):
    """The connection ended while the publish waited for its acknowledgement."""


class PubAcks:
    """The PUBACKs of one connection, by message id; once the connection is lost, each
    publish still waiting fails with ConnectionLost (it will never be acknowledged)."""

    def __init__(self) -> None:
        self._waiting: dict[int, asyncio.Future[ReasonCode]] = {}

    def expect(self, mid: int) -> asyncio.Future[ReasonCode]:
        future = asyncio.get_running_loop().create_future()
        self._waiting[mid] = future
        return future

    def lose(self) -> None:
        """The connection ended: fail every publish that waits."""
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(
                    ConnectionLost("connection lost before the broker acknowledged")
                )

    def forget(self, mid: int) -> None:
        self._waiting.pop(mid, None)

    def arrived(self, mid: int, reason_code: ReasonCode) -> None:
        future = self._waiting.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(reason_code)


#: (topic, payload, alert format of the subscription it arrived on)
MessageHandler = Callable[[str, bytes, str], Awaitable[None]]


async def _open_gate() -> None:
    return None


async def _ignore(topic: str, payload: bytes) -> None:
    return None


def _size(message: aiomqtt.Message) -> int:
    payload = message.payload
    return len(payload) if isinstance(payload, bytes | bytearray | str) else 0


class ByteBudget:
    """Bytes in flight, at most `limit` (one item larger than the limit still goes alone)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed = asyncio.Condition()

    async def take(self, size: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.used == 0 or self.used + size <= self.limit)
            self.used += size

    def give(self, size: int) -> None:
        self.used -= size
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()


def tls_context(settings: MqttSettings) -> ssl.SSLContext:
    """Certificate-checked TLS to the broker, with a client certificate when one is set;
    a file that cannot be used stops the start with its key and path."""
    ca = _tls_file(settings.tls_ca_file, "tls_ca_file")
    cert = _tls_file(settings.tls_cert_file, "tls_cert_file")
    key = _tls_file(settings.tls_key_file, "tls_key_file")
    try:
        context = ssl.create_default_context(cafile=ca)
    except ssl.SSLError as exc:
        raise CredentialError(
            f"{TLS_UNUSABLE}tls_ca_file {ca} holds no CA certificate: {exc}"
        ) from exc
    if cert is not None:
        try:
            context.load_cert_chain(cert, key, password=partial(_no_passphrase, key or cert))
        except ssl.SSLError as exc:
            raise CredentialError(
                f"{TLS_UNUSABLE}tls_cert_file {cert} and tls_key_file {key or cert} are not a "
                f"certificate and its key: {exc}"
            ) from exc
    return context


def _tls_file(path: Path | None, key: str) -> str | None:
    """The file's path (relative: in $CREDENTIALS_DIRECTORY), once it is known to be readable."""
    if path is None:
        return None
    found = credential_path(path)
    try:
        with found.open("rb"):
            pass
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise CredentialError(f"{TLS_UNUSABLE}cannot read {key} from {found}: {reason}") from exc
    return str(found)


def _credentials(settings: MqttSettings) -> tuple[str | None, ssl.SSLContext | None]:
    """The broker password and TLS context the settings' files give (CredentialError if a
    file cannot be used)."""
    password = (
        read_secret(settings.password_file, "[mqtt] password_file")
        if settings.password_file is not None
        else None
    )
    return password, tls_context(settings) if settings.uses_tls else None


def _no_passphrase(key: str) -> str:
    """Asked for an encrypted key's passphrase: refuse (OpenSSL would prompt on the terminal)."""
    raise CredentialError(f"{TLS_UNUSABLE}tls_key_file {key} is encrypted; give an unencrypted key")


def _login_refused(exc: aiomqtt.MqttError) -> bool:
    """Whether the broker answered the CONNECT with a refused login."""
    if not isinstance(exc, MqttConnectError):
        return False
    code = exc.rc if isinstance(exc.rc, int) else getattr(exc.rc, "value", None)
    return code in LOGIN_REFUSED


def backoff_delays(minimum: float, maximum: float) -> Callable[[], float]:
    """Successive delays: exponential from `minimum`, capped at `maximum`, each jittered
    down by up to half so a fleet of gateways does not reconnect in step."""
    attempt = 0

    def next_delay() -> float:
        nonlocal attempt
        ceiling = min(maximum, minimum * 2.0 ** min(attempt, 64))  # an outage of hours: no overflow
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
        # read at start, so that a missing file stops the start with its name
        self._password, self._tls = _credentials(settings)
        self._on_message = on_message
        #: called after every (re)connection, once subscribed
        self.on_connected = on_connected
        #: handles a message on the feedback topic
        self.on_feedback: Callable[[str, bytes], Awaitable[None]] = _ignore
        #: awaited before each alert is taken in (the daemon pauses intake there)
        self.intake_gate: Callable[[], Awaitable[None]] = _open_gate
        self._intake_open = True
        #: subscriptions whose alerts were seen arriving at QoS 0 (warned about once)
        self._qos0_warned: set[str] = set()
        self._client: aiomqtt.Client | None = None
        #: the broker's Maximum Packet Size (MQTT 5 CONNACK), None when it names none
        self._max_packet: int | None = None
        #: the current connection's PUBACKs (a new set for each connection)
        self._acks = PubAcks()
        self.connected = asyncio.Event()
        #: set once the first subscription is up
        self.subscribed = asyncio.Event()
        #: the filters the broker refused on this connection (its access list, or no shared
        #: subscriptions), with its reason
        self.refused: dict[str, str] = {}
        #: `offline` was published on this connection: leaving it needs no more
        self._offline_announced = False

    def reread_credentials(self) -> None:
        """Read the password and TLS files again (SIGHUP), for the next connection; a file
        that cannot be used keeps the ones in force."""
        s = self.settings
        try:
            self._password, self._tls = _credentials(s)
        except CredentialError as exc:
            log.error("mqtt credentials not re-read; those in force stay", error=str(exc))
            return
        if s.password_file is not None or s.uses_tls:
            log.info("mqtt credentials re-read: used from the next connection")

    def _make_client(self) -> aiomqtt.Client:
        s = self.settings
        session: dict[str, Any]
        if s.protocol == "5":
            connect = Properties(PacketTypes.CONNECT)
            connect.SessionExpiryInterval = s.session_expiry_s
            # the broker sends no more unacknowledged alerts than this: a paused intake
            # leaves the rest queued in the broker, not in our memory
            connect.ReceiveMaximum = INTAKE_WINDOW
            session = {
                "protocol": aiomqtt.ProtocolVersion.V5,
                "clean_start": s.session_expiry_s == 0,
                "properties": connect,
            }
        else:
            session = {
                "protocol": aiomqtt.ProtocolVersion.V311,
                "clean_session": s.session_expiry_s == 0,
            }
        client = aiomqtt.Client(
            s.host,
            s.port,
            identifier=s.client_id,
            keepalive=s.keepalive_s,
            will=aiomqtt.Will(s.status_topic, OFFLINE, qos=1, retain=True),
            timeout=10,
            username=s.username,
            password=self._password,
            tls_context=self._tls,
            **session,
        )
        # hold each PUBACK until the alert is journalled (see `_acknowledge_in_order`)
        client._client.manual_ack_set(True)
        # the outbox keeps a batch of publishes in flight: that is no reason to warn
        client.pending_calls_threshold = 1000
        # each PUBACK's reason code reaches `publish` (aiomqtt's own callback drops it)
        acks = self._acks = PubAcks()
        aiomqtt_on_publish = client._client.on_publish

        def on_publish(paho: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
            acks.arrived(mid, reason)
            aiomqtt_on_publish(paho, userdata, mid, reason, properties)

        client._client.on_publish = on_publish
        # MQTT 5: the largest packet the broker takes (it drops a client that sends more)
        self._max_packet = None
        aiomqtt_on_connect = client._client.on_connect

        def on_connect(paho: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
            self._max_packet = getattr(properties, "MaximumPacketSize", None)
            aiomqtt_on_connect(paho, userdata, flags, reason, properties)

        client._client.on_connect = on_connect
        # aiomqtt sets this when the connection ends; a link cancelled while it connects (a
        # daemon whose start fails) leaves no reader, and asyncio would log a traceback
        client._disconnected.add_done_callback(_read_out)
        return client

    async def run(self) -> None:
        """Stay connected until cancelled."""
        s = self.settings
        next_delay = backoff_delays(s.reconnect_min_s, s.reconnect_max_s)
        ever_up = False  # a broker that answered once is no TLS mix-up
        while True:
            up, intake_failed, error = False, False, "the connection ended"
            try:
                async with self._make_client() as client:
                    try:
                        await self._connected(client)
                        up = ever_up = True
                        _raise_if_cancelled()
                        await self._intake(client)
                    except BaseException as exc:
                        # a stop, a failed start, a subscription timed out: the connection is
                        # still up and about to be closed cleanly (a failed intake said it)
                        if not isinstance(exc, IntakeFailed) and not client._disconnected.done():
                            self._say_offline(client)
                        raise
            except aiomqtt.MqttError as exc:
                error = str(exc)
                intake_failed = isinstance(exc, IntakeFailed)
                if _login_refused(exc):
                    log.error(
                        "mqtt authorization failed: the broker refused the login; check "
                        "[mqtt] username, password_file and the client certificate",
                        username=s.username,
                        error=error,
                    )
            finally:
                self._client = None
                self._acks.lose()
                self.connected.clear()
            if up and not intake_failed:
                # a connection that worked: the next one starts with the shortest delay; one
                # dropped for a failed intake keeps growing it, lest a failure that repeats
                # make a reconnect loop
                next_delay = backoff_delays(s.reconnect_min_s, s.reconnect_max_s)
            delay = next_delay()
            hint = {}
            if not ever_up and not s.uses_tls and ("timed out" in error or "reset" in error):
                # a TLS listener says nothing to a plain CONNECT, or drops it
                hint = {
                    "hint": "no MQTT answer: is it the broker's port, and does it want TLS "
                    "([mqtt] tls)?"
                }
            log.warning("mqtt disconnected", error=error, retry_in_s=round(delay, 2), **hint)
            await asyncio.sleep(delay)

    async def _connected(self, client: aiomqtt.Client) -> None:
        """Say `online` (retained; the last will says `offline`), subscribe, and open."""
        s = self.settings
        await client.publish(s.status_topic, ONLINE, qos=1, retain=True)
        self._offline_announced = False
        self.refused = {}
        for subscription in self.subscriptions:
            await self._subscribe(client, self._filter(subscription.topic))
        if s.feedback_topic:
            # not shared: the gateway that holds the alert is the one that stores it
            await self._subscribe(client, s.feedback_topic)
        self._client = client
        self.connected.set()
        self.subscribed.set()
        topics = [subscription.topic for subscription in self.subscriptions]
        log.info("mqtt connected", host=s.host, port=s.port, subscribed=topics)
        self.on_connected()

    def _say_offline(self, client: aiomqtt.Client) -> None:
        """Before a disconnect of the daemon's own (which makes the broker drop the last
        will): the retained `offline`, unless said already on this connection. Queued at QoS 0
        ahead of the DISCONNECT, which goes out after it."""
        if not self._offline_announced:
            with contextlib.suppress(Exception):
                client._client.publish(self.settings.status_topic, OFFLINE, qos=0, retain=True)

    async def _subscribe(self, client: aiomqtt.Client, topic: str) -> None:
        """At QoS 1; on MQTT 5 retained messages only with a new subscription (the session
        keeps it across reconnects, so a retained alert is not delivered at each one). A
        filter the broker refuses is logged and listed in `refused`."""
        if self.settings.protocol == "5":
            granted = await client.subscribe(
                topic, options=SubscribeOptions(qos=1, retainHandling=1)
            )
        else:
            granted = await client.subscribe(topic, qos=1)
        # reason codes for either protocol (3.1.1's 0x80 is "Unspecified error")
        for code in granted:
            if code.is_failure:
                self.refused[topic] = str(code)
                log.error(
                    "mqtt subscription refused by the broker: nothing arrives on it",
                    topic=topic,
                    reason=str(code),
                )

    def _filter(self, topic: str) -> str:
        group = self.settings.share_group
        return f"$share/{group}/{topic}" if group else topic

    def close_intake(self) -> None:
        """Stop taking alerts; later ones stay unacknowledged, and the broker redelivers them."""
        self._intake_open = False

    async def _intake(self, client: aiomqtt.Client) -> None:
        """Journal alerts concurrently (so their writes share commits), acknowledge them in
        the order they arrived (as MQTT requires), at most INTAKE_WINDOW alerts and
        INTAKE_WINDOW_BYTES of payload at a time."""
        window: asyncio.Queue[tuple[asyncio.Task[None], aiomqtt.Message]] = asyncio.Queue(
            INTAKE_WINDOW
        )
        budget = ByteBudget(INTAKE_WINDOW_BYTES)
        ended = asyncio.create_task(_connection_end(client))
        tasks = {
            asyncio.create_task(self._acknowledge_in_order(client, window, budget)),
            asyncio.create_task(self._take_in(client, window, budget)),
            asyncio.create_task(self._watch_queue(client)),
            ended,
        }
        try:
            # any ends the connection: the reader when it is lost, the acker when an alert
            # could not be taken in (the reader may be waiting for room meanwhile), the
            # queue's watcher when too much waits in memory, and the connection's when it
            # ends while the reader waits at a paused intake (else publishes would wait on)
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        # why it ended: another's reason first (a failed intake disconnects, and its end
        # may be seen in the same turn)
        min(done, key=lambda task: task is ended).result()

    async def _take_in(
        self,
        client: aiomqtt.Client,
        window: asyncio.Queue[tuple[asyncio.Task[None], aiomqtt.Message]],
        budget: ByteBudget,
    ) -> None:
        async for message in client.messages:
            if not self._intake_open:
                continue  # unacknowledged: the broker delivers it again next session
            if message.qos == 0:
                self._warn_qos0(message)
            # paused while the backlog is full: the broker holds what follows
            await self.intake_gate()
            await budget.take(_size(message))
            await window.put((asyncio.create_task(self._ingest(message)), message))

    @staticmethod
    async def _watch_queue(client: aiomqtt.Client) -> None:
        """Drop the QoS 0 messages waiting in the client while more than QUEUE_MAX wait."""
        while True:
            await asyncio.sleep(QUEUE_CHECK_S)
            if (waiting := len(client.messages)) > QUEUE_MAX:
                dropped = _drop_qos0(client)
                if dropped:
                    log.warning(
                        "intake behind: QoS 0 messages dropped (the broker keeps no QoS 0 "
                        "message back; publish alerts at QoS 1 where the sender can)",
                        dropped=dropped,
                        waiting=waiting - dropped,
                    )

    def _subscription_of(self, message: aiomqtt.Message) -> Subscription | None:
        """The first subscription whose filter the message's topic matches."""
        return next((s for s in self.subscriptions if message.topic.matches(s.topic)), None)

    def _warn_qos0(self, message: aiomqtt.Message) -> None:
        subscription = self._subscription_of(message)
        if subscription is not None and subscription.topic not in self._qos0_warned:
            topic = subscription.topic
            self._qos0_warned.add(topic)
            # Frigate publishes at QoS 0 and cannot be told otherwise: the fact, no advice
            advice = "" if subscription.format == "frigate" else "; publish them at QoS 1"
            log.warning(
                "alerts arrive at QoS 0: the broker neither keeps them while the daemon is "
                f"down or paused nor delivers them again{advice}",
                subscription=topic,
            )

    async def _ingest(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        data = payload if isinstance(payload, bytes | bytearray) else str(payload or "").encode()
        feedback_topic = self.settings.feedback_topic
        if feedback_topic and message.topic.matches(feedback_topic):
            await self.on_feedback(str(message.topic), bytes(data))
            return
        subscription = self._subscription_of(message)
        fmt = subscription.format if subscription is not None else self.settings.format
        log.debug(
            "mqtt alert message",
            topic=str(message.topic),
            bytes=len(data),
            qos=message.qos,
            retained=bool(message.retain),
            format=fmt,
        )
        with parsing_retained(bool(message.retain)):
            await self._on_message(str(message.topic), bytes(data), fmt)

    async def _acknowledge_in_order(
        self,
        client: aiomqtt.Client,
        window: asyncio.Queue[tuple[asyncio.Task[None], aiomqtt.Message]],
        budget: ByteBudget,
    ) -> None:
        while True:
            task, message = await window.get()
            try:
                # shielded: when the connection drops and this coroutine is cancelled, the
                # alert's intake still runs to the end (its journal write, its review)
                await asyncio.shield(task)
            except Exception as exc:
                if not self._intake_open:
                    # stopping (a busy intake refuses it then): it and those behind it stay
                    # unacknowledged for the next session; the connection stays up for the
                    # last verdicts and the retained `offline`
                    await asyncio.Future()
                # not journalled: no PUBACK. Dropping the connection makes the broker deliver
                # it (and everything after it) again on the next one.
                log.exception("alert intake failed; reconnecting", topic=str(message.topic))
                self._say_offline(client)
                client._client.disconnect()
                raise IntakeFailed(f"alert intake failed: {exc!r}") from exc
            # PUBACK now: the alert is journalled (or the reason it was refused is)
            client._client.ack(message.mid, message.qos)
            budget.give(_size(message))

    async def publish(self, topic: str, payload: str | bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the broker's acknowledgement, or for the connection
        to be lost (a stalled broker is dropped by the keep-alive). No time limit of its
        own: a message given up on would still be sent by the client later, and then again
        by the outbox."""
        client, acks = self._client, self._acks
        if client is None:
            raise PublishError("not connected to the broker")
        if (
            self._max_packet is not None
            and (size := publish_packet_size(topic, payload)) > self._max_packet
        ):
            raise PublishRefused(
                f"a {size}-byte packet, over the broker's maximum packet size of "
                f"{self._max_packet} (it would drop the connection)"
            )
        info = client._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != paho_mqtt.MQTT_ERR_SUCCESS:
            raise PublishError(f"could not publish: {paho_mqtt.error_string(info.rc)}")
        try:
            reason = await acks.expect(info.mid)  # ConnectionLost when the connection ends
        finally:
            acks.forget(info.mid)  # cancelled: nobody waits for it any more
        if reason.is_failure:
            raise PublishRefused(f"the broker refused it: {reason} (reason code {reason.value})")

    async def announce_offline(self) -> None:
        """Clean shutdown: replace the retained `online` with `offline` (best effort)."""
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                await self.publish(self.settings.status_topic, OFFLINE, retain=True)
            self._offline_announced = True
        except (PublishError, TimeoutError) as exc:
            log.warning("could not publish offline status", error=str(exc) or "timed out")


def _read_out(future: asyncio.Future[None]) -> None:
    """Mark a future's exception as retrieved (whoever awaits it still gets it)."""
    if not future.cancelled():
        future.exception()


async def _connection_end(client: aiomqtt.Client) -> None:
    """Raise MqttError once the client's connection ends (it never returns)."""
    # aiomqtt's own future, set when paho loses (or closes) the connection; shielded, as
    # the cancelling of this watcher must not cancel it
    await asyncio.shield(client._disconnected)
    raise aiomqtt.MqttError("the connection ended")


def _drop_qos0(client: aiomqtt.Client) -> int:
    """Take the QoS 0 messages out of the client's queue of received ones; how many. (aiomqtt
    keeps them in an asyncio.Queue: nobody waits on a queue that holds messages, and it
    counts no unfinished tasks, so its deque may be filtered in place.)"""
    waiting = client._queue._queue  # type: ignore[attr-defined]
    kept = [message for message in waiting if message.qos > 0]
    dropped = len(waiting) - len(kept)
    waiting.clear()
    waiting.extend(kept)
    return dropped


def publish_packet_size(topic: str, payload: str | bytes) -> int:
    """The bytes of a QoS 1 PUBLISH without properties: fixed header (at most 5), topic
    length and topic, packet id, properties length (MQTT 5), payload."""
    body = len(payload.encode() if isinstance(payload, str) else payload)
    return 5 + 2 + len(topic.encode()) + 2 + 1 + body


async def publish_all(host: str, port: int, topic: str, payloads: Sequence[str | bytes]) -> None:
    """Publish every payload at QoS 1 from a client of its own, as fast as the broker takes
    them (benchmarks and tools)."""
    async with aiomqtt.Client(host, port, max_inflight_messages=1000) as client:
        client.pending_calls_threshold = len(payloads) + 1
        await asyncio.gather(*(client.publish(topic, payload, qos=1) for payload in payloads))
