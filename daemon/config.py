"""Daemon settings from a TOML file: every key has a default, unknown keys are errors."""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import tomllib
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from daemon.contract import Name, problem_text
from daemon.plugin_api import MAX_NEW_TOKENS

DEFAULT_VERDICT_TOPIC = "secondlook/verdicts/{verdict}/{box_id}/{camera_id}/{event_type}"


class ConfigError(Exception):
    """A config file that cannot be read or does not validate."""


class _Section(BaseModel):
    # TOML has inf and nan: no setting means either
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def topic_filter(topic: str) -> str:
    """A topic filter the broker takes: `+` and `#` each a whole level, `#` the last one; not
    a shared subscription (`$share/...`: `share_group` makes those, and the checks that the
    daemon never takes in its own messages compare plain filters)."""
    levels = topic.split("/")
    if not topic or "\0" in topic:
        raise ValueError("a topic filter is neither empty nor holds NUL")
    if levels[0] in ("$share", "$queue"):
        raise ValueError(
            f"{topic!r}: write the plain filter and set [mqtt] share_group for a shared "
            "subscription"
        )
    for i, level in enumerate(levels):
        if ("+" in level or "#" in level) and len(level) > 1:
            raise ValueError(f"{topic!r}: a wildcard (+ or #) must be a whole level")
        if level == "#" and i != len(levels) - 1:
            raise ValueError(f"{topic!r}: # must be the last level")
    return topic


def filters_overlap(a: str, b: str) -> bool:
    """Whether some topic matches both filters."""
    left, right = a.split("/"), b.split("/")
    for x, y in zip(left, right, strict=False):
        if "#" in (x, y):
            return True
        if x != y and "+" not in (x, y):
            return False
    longer = left if len(left) > len(right) else right
    return len(left) == len(right) or longer[min(len(left), len(right))] == "#"


def as_filter(template: str) -> str:
    """The filter matching every topic a topic template can render (`{field}` levels: +)."""
    return "/".join("+" if "{" in level else level for level in template.split("/"))


def publish_topic(topic: str) -> str:
    """A topic to publish on: not empty, no wildcards."""
    if not topic or "\0" in topic:
        raise ValueError("a topic is neither empty nor holds NUL")
    if "+" in topic or "#" in topic:
        raise ValueError(f"{topic!r}: a topic to publish on cannot hold the wildcards + or #")
    return topic


class Subscription(_Section):
    """A topic filter and the alert format of what arrives on it."""

    topic: str = Field(min_length=1)
    format: str = "canonical"

    _filter = field_validator("topic")(topic_filter)


class MqttSettings(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    subscribe: list[str] = Field(default_factory=lambda: ["secondlook/alerts/#"])
    #: alert format of the `subscribe` topics (a registered alert format's name)
    format: str = "canonical"
    #: more topics, each with its own format: [[mqtt.subscriptions]] topic = "..." format = "..."
    subscriptions: list[Subscription] = Field(default_factory=list)
    #: fixed so the broker keeps our session (and queued alerts) across restarts
    client_id: str = Field(
        default_factory=lambda: f"secondlook-{socket.gethostname()}", min_length=1, max_length=256
    )
    #: "5" (clean start off, a session expiry, a receive maximum) or "3.1.1" for old brokers
    protocol: Literal["5", "3.1.1"] = "5"
    #: how long the broker keeps the session, and queues alerts, while the daemon is away
    #: (0: a fresh session at each connect, nothing queued)
    session_expiry_s: int = Field(default=7 * 24 * 3600, ge=0, le=0xFFFFFFFF)
    #: gateways with the same share group split the alert topics between them (MQTT shared
    #: subscriptions, `$share/<group>/<topic>`): each alert is reviewed by one gateway
    share_group: str | None = Field(default=None, pattern=r"^[^/+#]+$")
    keepalive_s: int = Field(default=30, ge=5, le=65535)  # MQTT's keep-alive is 16 bits
    #: larger alert messages are refused (recorded and acknowledged), as HTTP's max_body_mb
    max_payload_mb: float = Field(default=20, gt=0)
    status_topic: str = "secondlook/status"
    #: operators' feedback on verdicts (JSON with alert_id, box_id, rule, correct | label);
    #: empty: not subscribed
    feedback_topic: str = "secondlook/feedback/#"
    verdict_topic: str = DEFAULT_VERDICT_TOPIC
    #: verdicts of rules in shadow mode go to this prefix + their usual topic
    shadow_prefix: str = "secondlook/shadow"
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    username: str | None = None
    #: a file holding the password (relative: in $CREDENTIALS_DIRECTORY under systemd)
    password_file: Path | None = None
    #: TLS to the broker (usually port 8883); on by itself when a CA or client cert is set
    tls: bool = False
    #: the CA that signed the broker's certificate (default: the system's CAs); the TLS files,
    #: when relative, are looked up like `password_file`
    tls_ca_file: Path | None = None
    #: a client certificate and its (unencrypted) key, for brokers that require one; without
    #: `tls_key_file` the key is read from the certificate file
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @field_validator("subscribe")
    @classmethod
    def _filters(cls, topics: list[str]) -> list[str]:
        return [topic_filter(topic) for topic in topics]

    @field_validator("feedback_topic")
    @classmethod
    def _feedback_filter(cls, topic: str) -> str:
        return topic_filter(topic) if topic else topic

    _publish_topics = field_validator("status_topic", "shadow_prefix")(publish_topic)

    @model_validator(mode="after")
    def _no_echo(self) -> MqttSettings:
        """The daemon must not take in what it publishes, nor feedback as alerts (a broker
        delivers a message once per matching subscription)."""
        verdicts = as_filter(self.verdict_topic)
        ours = {
            "status_topic": self.status_topic,
            "verdict_topic": verdicts,
            "shadow_prefix": f"{self.shadow_prefix}/{verdicts}",
        }
        for subscription in self.all_subscriptions():
            for key, topic in ours.items():
                if filters_overlap(subscription.topic, topic):
                    raise ValueError(
                        f"the alert topic {subscription.topic!r} would take in the daemon's own "
                        f"messages ({key} {topic!r}): narrow it"
                    )
            if self.feedback_topic and filters_overlap(subscription.topic, self.feedback_topic):
                raise ValueError(
                    f"the alert topic {subscription.topic!r} overlaps feedback_topic "
                    f"{self.feedback_topic!r}: feedback would arrive twice, once as an alert"
                )
        return self

    @model_validator(mode="after")
    def _key_with_cert(self) -> MqttSettings:
        if self.tls_key_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_key_file is set without tls_cert_file (the client certificate)")
        return self

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.tls_ca_file is not None or self.tls_cert_file is not None

    def all_subscriptions(self) -> list[Subscription]:
        """`subscribe` (in `format`) then `subscriptions`; the first filter that matches wins."""
        plain = [Subscription(topic=topic, format=self.format) for topic in self.subscribe]
        return plain + self.subscriptions

    def echo_of(self, template: str, shadow: bool = False) -> str | None:
        """Why verdicts published on the topics a rule's `template` renders (under the shadow
        prefix for a shadow rule) would come back to the daemon, or None. (Judged with MQTT
        off too: the offline commands judge rules as the daemon would with MQTT on.)"""
        topic = as_filter(f"{self.shadow_prefix}/{template}" if shadow else template)
        for subscription in self.all_subscriptions():
            if filters_overlap(subscription.topic, topic):
                return (
                    f"the alert topic {subscription.topic!r} would take its verdicts in as alerts"
                )
        if self.feedback_topic and filters_overlap(self.feedback_topic, topic):
            return f"the feedback topic {self.feedback_topic!r} would take its verdicts in"
        return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HttpSettings(_Section):
    enabled: bool = True
    listen: str = "127.0.0.1:8080"
    max_body_mb: float = Field(default=20, gt=0)
    #: bearer tokens, one per line (relative: in $CREDENTIALS_DIRECTORY under systemd); every
    #: request but /healthz and the console's static files then needs one; required when
    #: `listen` is not a loopback address
    tokens_file: Path | None = None

    @model_validator(mode="after")
    def _tokens_unless_loopback(self) -> HttpSettings:
        if self.tokens_file is None and not _is_loopback(self.host):
            raise ValueError(
                f"listen = {self.listen!r} is reachable from other machines: set tokens_file "
                "(bearer tokens), or listen on 127.0.0.1"
            )
        return self

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:8080")
        if not 1 <= int(port) <= 65535:
            raise ValueError(f"port {port} is not from 1 to 65535")
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class RemoteSettings(_Section):
    """The `openai` backend: an OpenAI-compatible chat-completions server (vLLM, SGLang,
    LMDeploy, Ollama) that serves a vision model."""

    #: base URL, e.g. http://gpu-box:8000/v1 (POST {url}/chat/completions)
    url: str = "http://127.0.0.1:8000/v1"

    @field_validator("url")
    @classmethod
    def _plain_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http(s) URL, got {value!r}")
        if parts.username or parts.password:  # it is logged and shown in /healthz
            raise ValueError("no user or password in the URL: put the key in api_key_file")
        return value

    #: the served model's name; default: [model] path
    model: str | None = None
    #: a file holding the API key (systemd LoadCredential puts it in $CREDENTIALS_DIRECTORY)
    api_key_file: Path | None = None
    timeout_s: float = Field(default=30.0, gt=0)
    #: retries after a timeout, a connection error, HTTP 429 or 5xx (not after other 4xx)
    max_retries: int = Field(default=3, ge=0, le=20)
    retry_backoff_s: float = Field(default=0.5, ge=0)
    #: requests in flight at once
    concurrency: int = Field(default=16, ge=1, le=1024)
    #: how many alternatives per answer token the server lists (OpenAI allows at most 20)
    top_logprobs: int = Field(default=20, ge=1, le=20)
    #: pixels per side of one visual token of the served model: 28 (Qwen2-VL, Qwen2.5-VL),
    #: 32 (Qwen3-VL)
    image_factor: int = Field(default=28, ge=1, le=64)


def looks_local(path: str) -> bool:
    """A model path as a user writes a directory (absolute, ./, ../), not a hub id."""
    return path.startswith(("/", "./", "../")) or path in (".", "..")


class ModelSettings(_Section):
    backend: str = "transformers"
    #: hub id or local directory
    path: str = "Qwen/Qwen2-VL-2B-Instruct"
    #: name reported in verdicts; defaults to the last part of `path`
    name: str | None = None
    device: str = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    #: auto: flash_attention_2 on CUDA when installed, else sdpa
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    #: torch.compile each block of the model (see daemon/inference/compiling.py); the warm-up
    #: compiles for every batch and image size
    compile: bool = False
    #: one small pass before READY, so the first alert does not pay for initialisation
    warmup: bool = True
    #: where the model runs: a thread of the daemon, or a process of its own whose passes
    #: do not wait for the daemon's Python (see daemon/inference/model_process.py)
    worker: Literal["thread", "process"] = "thread"
    #: a batch running longer than this means the worker is stuck: the systemd watchdog is
    #: no longer fed, and systemd restarts the daemon
    stall_timeout_s: float = Field(default=120, gt=0)
    #: requests sharing one pass at most
    max_batch: int = Field(default=16, ge=1, le=512)
    #: how long the oldest waiting request waits for company before its batch runs
    max_wait_ms: float = Field(default=10.0, ge=0, le=1000)
    #: the `openai` backend's server
    remote: RemoteSettings = Field(default_factory=RemoteSettings)
    #: token budget: each image is scaled to at most this many pixels before the processor
    image_max_pixels: int = Field(default=448 * 448, ge=28 * 28)
    #: the longest answer an extract rule may generate
    max_new_tokens: int = Field(default=256, ge=1, le=MAX_NEW_TOKENS)

    @property
    def display_name(self) -> str:
        return self.name or self.path.rstrip("/").rsplit("/", 1)[-1]


class ImageSettings(_Section):
    #: larger snapshots are refused from their header, before decoding
    max_input_pixels: int = Field(default=40_000_000, ge=1)
    max_bytes_mb: float = Field(default=15, gt=0)
    #: extra frames (`images`) an alert may carry, at most: each costs as much model time
    #: as the snapshot itself
    max_extra_images: int = Field(default=8, ge=0, le=64)
    #: hosts `image_url` may point to; empty refuses every `image_url`
    url_hosts: list[str] = Field(default_factory=list)
    url_timeout_s: float = Field(default=5.0, gt=0)

    @field_validator("url_hosts")
    @classmethod
    def _host_names(cls, value: list[str]) -> list[str]:
        # URLs' host names compare in lower case, without a trailing dot
        return [host.strip().lower().rstrip(".") for host in value]

    #: the last resize step after a JPEG draft decode: fast (nearest, when the step is mild)
    #: or bicubic (see daemon.images.Budget for the measured difference)
    resample: Literal["fast", "bicubic"] = "fast"


class RulesSettings(_Section):
    dir: Path = Path("rules")
    #: what to do with an alert no rule matches
    unmatched: Literal["forward", "drop"] = "forward"


class StorageSettings(_Section):
    dir: Path = Path("var")
    #: snapshots of alerts that are reviewed and published are deleted after this many days
    snapshot_max_age_days: float = Field(default=7, gt=0)
    #: ... and, oldest first, while all snapshots together exceed this
    snapshot_max_mb: float = Field(default=2048, gt=0)
    #: reviewed and published alerts, their verdicts and refused payloads: deleted after
    journal_max_age_days: float = Field(default=90, gt=0)
    #: how often the journal is pruned
    prune_interval_s: float = Field(default=600, gt=0)
    #: below this much free space on the journal's disk intake pauses (HTTP 503, MQTT
    #: unacknowledged) until space is back
    min_free_mb: float = Field(default=256, ge=0)
    #: how often free space is checked
    check_interval_s: float = Field(default=5, gt=0)


class PipelineSettings(_Section):
    #: concurrent reviews: images are prepared and journal commits awaited while the model
    #: works, and the model batches what waits for it (four times `max_batch`, so that a
    #: full batch can wait while others prepare; measured in the README's pipeline bench)
    workers: int = Field(default=64, ge=1, le=256)
    #: reviews interrupted this many times end as `unreviewed`
    max_attempts: int = Field(default=3, ge=1)
    #: row ids of waiting alerts kept in memory; the journal holds the rest
    queue_size: int = Field(default=1024, ge=1)
    #: alerts journalled but not reviewed, at most: beyond, HTTP intake answers 503 and MQTT
    #: intake pauses (the broker holds the messages) until it falls below nine tenths
    max_backlog: int = Field(default=20_000, ge=1)
    #: on SIGTERM, reviews under way get this long to finish; the rest stay journalled and
    #: resume at the next start (keep it about 35 s below the unit's TimeoutStopSec: the stop
    #: adds up to 3 s for HTTP, 10 s for the last publishing, 10 s for `offline`, 10 s for
    #: closing the model worker)
    stop_grace_s: float = Field(default=20, ge=0)


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    #: auto: readable on a terminal, JSON lines otherwise
    format: Literal["auto", "json", "console"] = "auto"


def offset_tz(offset: str) -> tzinfo:
    """The time zone of a UTC offset such as +08:00 or Z; ValueError if it is none."""
    zone = None
    # hours and minutes only (+08:00, +0800, +08): Python would also take seconds
    if re.fullmatch(r"Z|[+-]\d\d(:?\d\d)?", offset):
        with contextlib.suppress(ValueError):
            zone = datetime.fromisoformat(f"2000-01-01T00:00:00{offset}").tzinfo
    if zone is None:
        raise ValueError(f"expected a UTC offset such as +08:00, got {offset!r}")
    return zone


def _utc_offset(value: str) -> str:
    offset_tz(value)
    return value


UtcOffset = Annotated[str, AfterValidator(_utc_offset)]


class FrigateSettings(_Section):
    """The `frigate` alert format: Frigate's `frigate/events` and snapshot topics."""

    #: the `box_id` of alerts from this Frigate instance
    box_id: Name = "frigate"
    site: str | None = Field(default=None, max_length=256)
    #: Frigate's HTTP API (e.g. http://frigate:5000): snapshots of events that arrive before
    #: their snapshot topic; its host must be in [images] url_hosts
    api_url: str | None = None
    #: which event messages are reviewed: new, update, end (one review per event id)
    review: list[Literal["new", "update", "end"]] = Field(default_factory=lambda: ["new"])
    #: the cameras' UTC offset: `occurred_at` is written in it, so that rules' `hours` are
    #: the cameras' local time (Frigate sends Unix times)
    utc_offset: UtcOffset = "+00:00"


#: the contract's fields a mapped format may fill
MAPPED_FIELDS = {
    "alert_id",
    "box_id",
    "camera_id",
    "event_type",
    "occurred_at",
    "image",
    "image_url",
    "images",
    "score",
    "boxes",
    "site",
}


class MappingFormat(_Section):
    """An alert format made of configuration: where each contract field is in a payload.

    Paths are dotted (`alarm.device.sn`, `pictures.0.data`); a value starting with `=` is a
    constant (`site = "=plant-north"`).
    """

    fields: dict[str, str]
    #: how `occurred_at` is written: rfc3339, epoch_s, epoch_ms, or a strptime pattern
    time_format: str = "rfc3339"
    #: the UTC offset of times written without one
    utc_offset: UtcOffset = "+00:00"
    #: value translations per contract field, e.g. values.event_type = { "1001" = "fire" }
    values: dict[str, dict[str, str]] = Field(default_factory=dict)
    #: keys of the alert's `extra` and the paths they come from
    extra: dict[str, str] = Field(default_factory=dict)

    @field_validator("fields")
    @classmethod
    def _contract_fields(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - MAPPED_FIELDS)
        if unknown:
            raise ValueError(f"not contract fields: {', '.join(unknown)}")
        required = {"alert_id", "box_id", "camera_id", "event_type", "occurred_at"}
        missing = sorted(required - set(value))
        if missing:
            raise ValueError(f"missing required fields: {', '.join(missing)}")
        if "image" not in value and "image_url" not in value:
            raise ValueError("one of image or image_url is required")
        return value

    @field_validator("time_format")
    @classmethod
    def _time_pattern(cls, value: str) -> str:
        if value in ("rfc3339", "epoch_s", "epoch_ms"):
            return value
        sample = datetime(2026, 11, 30, 12, 34, 56, tzinfo=UTC)  # %Z and %z write something
        try:
            read = datetime.strptime(sample.strftime(value), value)
        except ValueError as exc:
            raise ValueError(f"not a strptime pattern ({exc}): {value!r}") from None
        if read.date() != sample.date():
            raise ValueError(
                f"{value!r} does not give the date (year, month and day, e.g. %Y-%m-%d "
                "%H:%M:%S); or rfc3339, epoch_s, epoch_ms"
            )
        return value

    @field_validator("values")
    @classmethod
    def _values_of_fields(cls, value: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        if unknown := sorted(set(value) - MAPPED_FIELDS):
            raise ValueError(f"not contract fields: {', '.join(unknown)}")
        return value


class PluginSettings(_Section):
    #: a folder of loose `*.py` plugin files, loaded at start
    dir: Path | None = None


class Settings(_Section):
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    rules: RulesSettings = Field(default_factory=RulesSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    frigate: FrigateSettings = Field(default_factory=FrigateSettings)
    #: field-mapping alert formats, by name: [formats.<name>]
    formats: dict[str, MappingFormat] = Field(default_factory=dict)
    plugins: PluginSettings = Field(default_factory=PluginSettings)

    @model_validator(mode="after")
    def _frigate_api_allowed(self) -> Settings:
        api = self.frigate.api_url
        if api is not None:
            parts = urlsplit(api)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"frigate.api_url: expected an http(s) URL, got {api!r}")
            if parts.hostname.rstrip(".") not in self.images.url_hosts:
                raise ValueError(
                    f"frigate.api_url: its host {parts.hostname!r} must be in [images] "
                    "url_hosts, or every snapshot fetched from it is refused"
                )
        return self

    def resolve_paths(self, base: Path) -> Settings:
        """Relative directories are taken relative to `base` (the config file's folder).

        A relative `[model] path` is a local directory only when `base` holds it; else it is a
        hub id (or a directory of the working directory), as transformers reads it. The
        remote backend's served model keeps the name as written.
        """
        rules = self.rules.model_copy(update={"dir": base / self.rules.dir})
        storage = self.storage.model_copy(update={"dir": base / self.storage.dir})
        updates: dict[str, object] = {"rules": rules, "storage": storage}
        if self.plugins.dir is not None:
            updates["plugins"] = self.plugins.model_copy(update={"dir": base / self.plugins.dir})
        model_dir = base / self.model.path
        if not Path(self.model.path).is_absolute() and model_dir.is_dir():
            remote = self.model.remote
            if remote.model is None:
                remote = remote.model_copy(update={"model": self.model.path})
            updates["model"] = self.model.model_copy(
                update={"path": str(model_dir), "remote": remote}
            )
        return self.model_copy(update=updates)


def key_path(loc: tuple[int | str, ...], prefix: str = "") -> str:
    """`section.key` of a validation error's location; a check across keys names its section."""
    return (prefix + ".".join(str(part) for part in loc)).rstrip(".") or "(top level)"


def describe_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One line per problem: `key.path: reason` (a check across sections names its keys
    in its reason)."""
    return "\n".join(
        f"{key_path(item['loc'], prefix)}: {problem_text(item)}"
        if item["loc"]
        else prefix + problem_text(item)
        for item in error.errors()
    )


def load_settings(path: Path | None) -> Settings:
    """Read a config file; no file means all defaults, relative to the working directory."""
    if path is None:
        return Settings()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from exc
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, prefix=f"{path}: ")) from exc
    return settings.resolve_paths(path.resolve().parent)
