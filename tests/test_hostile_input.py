"""Hostile input: fuzzed alerts and rule files, decompression bombs, and image URLs that try
to reach inside (link-local metadata, loopback by name, redirects)."""

from __future__ import annotations

import base64
import ipaddress
import json
import socket
import struct
import tomllib
import zlib
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.config import ImageSettings
from daemon.contract import Alert
from daemon.pipeline import parse_payload
from daemon.plugin_api import AlertError
from daemon.plugins import Registry, make_plugin_manager
from daemon.rules import RuleError, parse_rule
from daemon.snapshots import check_image_url
from daemon.url_guard import GuardedResolver, refusal
from tests.conftest import FIRE_RULE, jpeg_bytes, make_alert, make_settings, run_daemon, serve

REGISTRY = Registry.collect(make_plugin_manager())
CANONICAL = REGISTRY.alert_formats["canonical"]
IMAGES = ImageSettings(max_input_pixels=4_000_000, url_hosts=["cams.example"])
VALID = make_alert("fuzz-1", image=base64.b64encode(jpeg_bytes((64, 48))).decode())
FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def check_alert_payload(payload: bytes) -> None:
    """Accepted, or refused with an AlertError naming a field and saying why."""
    try:
        parse_payload(payload, None, CANONICAL, "canonical", IMAGES)
    except AlertError as exc:
        assert exc.field and exc.message, exc


def nested(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = [value]
    return value


def test_more_extra_frames_than_allowed_are_refused_naming_the_limit():
    frame = base64.b64encode(jpeg_bytes((64, 48))).decode()
    parse_payload(
        json.dumps(VALID | {"images": [frame] * 8}).encode(), None, CANONICAL, "canonical", IMAGES
    )
    with pytest.raises(AlertError) as refused:
        parse_payload(
            json.dumps(VALID | {"images": [frame] * 9}).encode(),
            None,
            CANONICAL,
            "canonical",
            IMAGES,
        )
    assert refused.value.field == "images"
    assert "9 extra frames, over [images] max_extra_images (8)" in refused.value.message


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"image": "data:image/jpeg;base64"}, "image", "data: URL without a comma"),
        (
            {"boxes": [{"x1": 1, "y1": 1, "x2": 2, "y2": 2, "meta": nested(40)}]},
            "boxes[0]",
            "nested more than 32 levels deep",
        ),
        ({"extra": {"a": nested(40)}}, "extra", "nested more than 32 levels deep"),
        (
            {"boxes": [{"x1": 1, "y1": 1, "x2": 2, "y2": 2}] * 257},
            "boxes",
            "257 detections, over the limit of 256 per alert",
        ),
        ({"extra": {"v": [float("nan")]}}, "extra", "holds nan, which is no JSON number"),
        # two keys the journal would both write as U+FFFD: one value would be lost
        (
            {"extra": {chr(0xD800): 1, chr(0xDC00): 2}},
            "extra",
            "a key holds a lone UTF-16 surrogate",
        ),
        ({"image": ""}, "image", "one of image or image_url is required"),
        (
            {"boxes": [{"x1": 1, "y1": 1, "x2": 2, "y2": 2, "track": float("inf")}]},
            "boxes[0]",
            "holds inf, which is no JSON number",
        ),
    ],
)
def test_odd_shapes_are_refused_naming_the_field(changes, field, message):
    with pytest.raises(AlertError) as refused:
        parse_payload(json.dumps(VALID | changes).encode(), None, CANONICAL, "canonical", IMAGES)
    assert refused.value.field == field and message in refused.value.message


def test_an_empty_image_beside_an_image_url_is_no_picture_of_its_own():
    payload = json.dumps(VALID | {"image": "", "image_url": "http://cams.example/1.jpg"})
    incoming = parse_payload(payload.encode(), None, CANONICAL, "canonical", IMAGES)
    assert incoming.images == [] and incoming.alert.image_url == "http://cams.example/1.jpg"


def test_an_alert_journalled_before_the_box_limit_still_loads():
    boxes = [{"x1": 1, "y1": 1, "x2": 2, "y2": 2}] * 300
    assert len(Alert.model_validate(VALID | {"boxes": boxes}).boxes) == 300


@FUZZ
@given(st.binary(max_size=400))
def test_fuzzed_bytes_are_refused_with_a_reason(payload):
    check_alert_payload(payload)


@FUZZ
@given(json_values)
def test_fuzzed_json_values_are_refused_with_a_reason(value):
    check_alert_payload(json.dumps(value).encode())


@FUZZ
@given(
    field=st.sampled_from([*VALID, "boxes", "images", "score", "image_url", "extra"]),
    value=json_values | st.text(min_size=1000, max_size=5000) | st.just("data:,AAAA"),
    drop=st.booleans(),
)
def test_mutated_alerts_are_accepted_or_refused_naming_the_field(field, value, drop):
    alert = dict(VALID)
    if drop:
        alert.pop(field, None)
    else:
        alert[field] = value
    check_alert_payload(json.dumps(alert).encode())


RULE_KEYS = ["description", "priority", "enabled", "shadow", "max_age_s", "match", "review",
             "cooldown", "publish", "name", "exclusive"]  # fmt: skip
REVIEW_KEYS = ["kind", "prompt", "image", "on_error", "confirm_at", "reject_below", "labels",
               "fields", "crop_margin", "max_new_tokens"]  # fmt: skip


def check_rule_text(text: str) -> None:
    """Loaded, or refused with a RuleError saying where and why."""
    try:
        parse_rule(Path("fuzz.toml"), text, REGISTRY.rule_kinds)
    except RuleError as exc:
        assert exc.reason and str(exc).startswith("fuzz.toml"), exc


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if value == value and abs(value) != float("inf") else "nan"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


@FUZZ
@given(st.text(max_size=300))
def test_fuzzed_rule_text_is_refused_with_a_reason(text):
    check_rule_text(text)


@FUZZ
@given(
    section=st.sampled_from(["", "match", "review"]),
    key=st.sampled_from(RULE_KEYS + REVIEW_KEYS + ["event_types", "hours", "min_score", "x"]),
    value=st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.lists(st.text(max_size=10), max_size=3),
)
def test_mutated_rule_files_load_or_are_refused_naming_the_key(section, key, value):
    data = tomllib.loads(FIRE_RULE)
    target = data if not section else data[section]
    if value is None:
        target.pop(key, None)
    else:
        target[key] = value
    lines = [f"{k} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for name, table in data.items():
        if isinstance(table, dict):
            lines.append(f"[{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    check_rule_text("\n".join(lines))


# decompression bombs --------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


async def test_a_decompression_bomb_over_http_is_refused_and_the_daemon_goes_on(
    tmp_path, tiny_model
):
    settings_ = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings_.rules.dir / "fire.toml").write_text(FIRE_RULE)
    bomb = base64.b64encode(png_claiming(30_000, 30_000)).decode()
    async with run_daemon(settings_) as d:
        status, body = await d.post_alert(make_alert("bomb", image=bomb))
        assert status == 400 and body["field"] == "image"
        assert "900000000 pixels" in body["error"] or "bomb" in body["error"]
        assert (await d.post_alert(make_alert("after-bomb")))[0] == 202
        assert (await d.wait_reviewed("after-bomb"))["verdicts"][0]["rule"] == "fire"


# image_url: SSRF ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"),
        ("240.0.0.1", "reserved"),
        ("0.1.2.3", "unspecified"),
        ("fd00:ec2::254", "cloud metadata"),
        ("100.100.100.200", "cloud metadata"),
        ("2002:a9fe:a9fe::1", "link-local"),  # 6to4 of 169.254.169.254
        ("10.1.2.3", None),
        ("192.0.2.10", None),
    ],
)
def test_which_addresses_are_refused(address, reason):
    assert refusal(ipaddress.ip_address(address), loopback_allowed=False) == reason


def test_a_link_local_literal_is_refused_even_when_listed():
    listed = ImageSettings(url_hosts=["169.254.169.254", "127.0.0.1"])
    with pytest.raises(AlertError, match=r"link-local address 169\.254\.169\.254 is never fetched"):
        check_image_url("http://169.254.169.254/latest/meta-data/", listed)
    check_image_url("http://127.0.0.1/snap.jpg", listed)  # a loopback literal, listed: fine


def test_allowed_hosts_compare_as_urls_write_them():
    listed = ImageSettings(url_hosts=["Camera.Plant.example."])
    check_image_url("http://camera.plant.example/snap.jpg", listed)
    check_image_url("http://CAMERA.plant.example./snap.jpg", listed)
    with pytest.raises(AlertError, match="not in the allowed hosts"):
        check_image_url("http://camera2.plant.example/snap.jpg", listed)


class FixedLookup(GuardedResolver):
    """The guard, over a lookup table instead of DNS."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        super().__init__()
        self.table = table

        async def lookup(host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
            return [
                {
                    "hostname": host,
                    "host": ip,
                    "port": port,
                    "family": family,
                    "proto": 0,
                    "flags": 0,
                }
                for ip in self.table[host]
            ]

        self._inner.resolve = lookup  # type: ignore[method-assign]


async def test_names_are_checked_against_what_they_resolve_to():
    resolver = FixedLookup(
        {
            "rebound.example": ["169.254.169.254"],
            "mixed.example": ["169.254.169.254", "10.0.0.7"],
            "inside.example": ["127.0.0.1"],
            "localhost": ["127.0.0.1"],
            "LocalHost.": ["127.0.0.1"],  # as the allowed hosts compare: the same name
        }
    )
    with pytest.raises(
        OSError,
        match=r"'rebound\.example' resolves only to refused addresses "
        r"\(link-local 169\.254\.169\.254\)",
    ):
        await resolver.resolve("rebound.example", 80)
    assert [r["host"] for r in await resolver.resolve("mixed.example", 80)] == ["10.0.0.7"]
    with pytest.raises(OSError, match=r"loopback 127\.0\.0\.1"):
        await resolver.resolve("inside.example", 80)
    for name in ("localhost", "LocalHost."):
        assert [r["host"] for r in await resolver.resolve(name, 80)] == ["127.0.0.1"]
    await resolver.close()


async def test_image_urls_reach_only_allowed_places(tmp_path, tiny_model):
    app = web.Application()
    app.router.add_get(
        "/snap.jpg", lambda _: web.Response(body=jpeg_bytes(), content_type="image/jpeg")
    )
    app.router.add_get("/hop", lambda _: web.HTTPFound("/snap.jpg"))
    async with serve(app) as base:
        port = base.rsplit(":", 1)[1]
        settings_ = make_settings(
            tmp_path,
            broker=None,
            model=tiny_model,
            images={"url_hosts": ["localhost", "169.254.169.254"]},
        )
        (settings_.rules.dir / "fire.toml").write_text(FIRE_RULE)
        async with run_daemon(settings_) as d:
            status, body = await d.post_alert(
                make_alert("meta", image=None, image_url="http://169.254.169.254/latest/meta-data")
            )
            assert status == 400 and body["field"] == "image_url" and "link-local" in body["error"]
            urls = {
                "by-localhost": f"http://localhost:{port}/snap.jpg",
                "redirect": f"http://localhost:{port}/hop",
            }
            for alert_id, url in urls.items():
                assert (await d.post_alert(make_alert(alert_id, image=None, image_url=url)))[
                    0
                ] == 202
            verdicts = {a: (await d.wait_reviewed(a))["verdicts"][0] for a in urls}
    assert verdicts["by-localhost"]["confidence"] is not None
    assert verdicts["redirect"]["verdict"] == "unreviewed"
    assert "image_url answered HTTP 302" in verdicts["redirect"]["reason"]
