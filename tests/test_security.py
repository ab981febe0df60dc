"""Nobody in: MQTT over TLS with a client certificate and a password from a credentials file,
HTTP bearer tokens, and secrets that never reach the logs."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import ssl
from pathlib import Path

import aiohttp
import aiomqtt
import pytest
import structlog

from daemon.config import ConfigError, LogSettings, load_settings
from daemon.credentials import CredentialError
from daemon.logs import configure_logging
from daemon.mqtt import MqttLink
from tests.conftest import FIRE_RULE, Broker, make_alert, make_settings, run_daemon
from tests.tls_broker import make_pki, tls_only_broker

PASSWORD = "s3cret-Pa55word-never-logged"
TOKEN = "tok-7d1f0c2a9b-never-logged"


@pytest.fixture
def tls_broker(tmp_path):
    """A mosquitto that takes only TLS clients with a certificate of our CA and a password."""
    pki = make_pki(tmp_path)
    broker = tls_only_broker(tmp_path, pki, "gateway", PASSWORD)
    yield broker, pki
    broker.stop()


def tls_settings(tmp_path: Path, broker: Broker, pki: dict[str, Path], password: str, model):
    (tmp_path / "credentials").mkdir(exist_ok=True)
    (tmp_path / "credentials" / "mqtt-password").write_text(password + "\n")
    settings = make_settings(
        tmp_path,
        broker=broker,
        model=model,
        mqtt={
            "username": "gateway",
            "password_file": "mqtt-password",  # found in $CREDENTIALS_DIRECTORY
            "tls_ca_file": str(pki["ca.crt"]),
            "tls_cert_file": str(pki["client.crt"]),
            "tls_key_file": str(pki["client.key"]),
        },
    )
    return settings


def client_tls(pki: dict[str, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki["ca.crt"]))
    context.load_cert_chain(pki["client.crt"], pki["client.key"])
    return context


async def test_alerts_over_tls_with_a_client_certificate_and_a_password_from_a_file(
    tmp_path, tls_broker, tiny_model, monkeypatch, capsys
):
    broker, pki = tls_broker
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "credentials"))
    settings = tls_settings(tmp_path, broker, pki, PASSWORD, tiny_model)
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    assert PASSWORD not in repr(settings)
    tls = client_tls(pki)
    login = {"username": "gateway", "password": PASSWORD, "tls_context": tls}
    async with run_daemon(settings), aiomqtt.Client("127.0.0.1", broker.port, **login) as client:
        await client.subscribe("secondlook/verdicts/#", qos=1)
        await client.publish("secondlook/alerts/b", json.dumps(make_alert("tls-1")), qos=1)
        async with asyncio.timeout(30):
            async for message in client.messages:
                verdict = json.loads(message.payload)
                break
    assert verdict["alert_id"] == "tls-1" and verdict["rule"] == "fire"
    logged = capsys.readouterr()
    assert "mqtt connected" in logged.out + logged.err  # the logs were captured ...
    assert PASSWORD not in logged.out + logged.err  # ... and hold no password


async def test_a_wrong_password_is_logged_without_it_and_retried(
    tmp_path, tls_broker, tiny_model, monkeypatch, capsys
):
    broker, pki = tls_broker
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "credentials"))
    wrong = "not-the-password-42"
    settings = tls_settings(tmp_path, broker, pki, wrong, tiny_model)

    async def ignore(*_: object) -> None:
        return None

    configure_logging(settings.log)  # JSON lines, as the daemon writes them
    link = MqttLink(settings.mqtt, on_message=ignore)
    task = asyncio.create_task(link.run())
    await asyncio.sleep(1.5)  # several attempts with the test's short backoff
    assert not task.done() and not link.subscribed.is_set()
    task.cancel()
    logged = capsys.readouterr()
    output = logged.out + logged.err
    refusals = [json.loads(line) for line in output.splitlines() if "mqtt disconnected" in line]
    assert len(refusals) >= 2 and "not authorized" in refusals[0]["error"].lower(), output
    assert wrong not in output


def test_a_missing_credentials_file_or_certificate_stops_the_start_naming_it(tmp_path):
    settings = make_settings(
        tmp_path, broker=None, model=tmp_path, mqtt={"password_file": str(tmp_path / "nope")}
    )
    with pytest.raises(CredentialError, match=f"password_file from {tmp_path / 'nope'}"):
        MqttLink(settings.mqtt, on_message=None)  # type: ignore[arg-type]
    settings = make_settings(
        tmp_path, broker=None, model=tmp_path, mqtt={"tls_ca_file": str(tmp_path / "ca.pem")}
    )
    with pytest.raises(CredentialError, match="TLS files cannot be used"):
        MqttLink(settings.mqtt, on_message=None)  # type: ignore[arg-type]


def test_http_on_a_non_loopback_address_requires_tokens(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[http]\nlisten = "0.0.0.0:8080"\n')
    with pytest.raises(ConfigError, match="reachable from other machines: set tokens_file"):
        load_settings(config)
    config.write_text('[http]\nlisten = "0.0.0.0:8080"\ntokens_file = "tokens"\n')
    assert load_settings(config).http.tokens_file is not None


async def test_http_requests_need_a_bearer_token_from_the_tokens_file(tmp_path, tiny_model, capsys):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# operators\n{TOKEN}\n\nsecond-token\n")
    settings = make_settings(
        tmp_path, broker=None, model=tiny_model, http={"tokens_file": str(tokens)}
    )
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    alert = make_alert("auth-1")
    async with run_daemon(settings) as d, aiohttp.ClientSession() as http:
        url = f"{d.base_url}/v1/alerts"

        async def post(headers: dict[str, str]) -> tuple[int, dict, aiohttp.ClientResponse]:
            async with http.post(url, json=alert, headers=headers) as response:
                return response.status, await response.json(), response

        status, body, response = await post({})
        assert status == 401 and "bearer token is required" in body["error"]
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await post({"Authorization": f"Bearer {TOKEN}x"}))[0] == 401
        assert (await post({"Authorization": f"Basic {TOKEN}"}))[0] == 401
        async with http.get(f"{d.base_url}/v1/alerts/auth-1") as response:
            assert response.status == 401  # reading needs it too
        async with http.get(f"{d.base_url}/healthz") as response:
            assert response.status == 200  # readiness stays open for probes
        assert (await post({"Authorization": f"Bearer {TOKEN}"}))[0] == 202
        assert (await post({"Authorization": "Bearer second-token"}))[0] == 202  # duplicate
        async with http.get(
            f"{d.base_url}/v1/alerts/auth-1", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as response:
            assert response.status == 200
        # the token is checked before the body is read: no token, huge body, still 401
        huge = b"x" * (int(settings.http.max_body_mb * 2**20) + 1)
        async with http.post(url, data=huge) as response:
            assert response.status == 401
        # nor is a body asked for ("Expect: 100-continue") that would not be read
        host, port = d.settings.http.listen.split(":")

        async def first_line(headers: str) -> bytes:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                b"POST /v1/alerts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Expect: 100-continue\r\n{headers}\r\n".encode()
            )
            try:
                async with asyncio.timeout(5):
                    return await reader.readline()
            finally:
                writer.close()

        bearer = f"Authorization: Bearer {TOKEN}\r\n"
        assert (await first_line("Content-Length: 10\r\n")).startswith(b"HTTP/1.1 401")
        over = f"Content-Length: {len(huge)}\r\n"
        assert (await first_line(bearer + over)).startswith(b"HTTP/1.1 413")
        assert await first_line(bearer + "Content-Length: 10\r\n") == b"HTTP/1.1 100 Continue\r\n"
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with http.post(url, json=alert, headers=headers, expect100=True) as response:
            assert response.status == 202
        # the console's files are open; any other name there is a JSON 404
        async with http.get(f"{d.base_url}/console/static/app.js") as response:
            assert response.status == 200
        async with http.get(f"{d.base_url}/console/static/nope.js") as response:
            assert response.status == 404 and (await response.json())["error"]
    logged = capsys.readouterr()
    assert "http request with a wrong token" in logged.out + logged.err
    assert TOKEN not in logged.out + logged.err


async def test_without_tokens_what_web_pages_send_is_refused(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    rule = '[match]\nevent_types = ["*"]\n[review]\nprompt = "Answer no."\n'
    async with run_daemon(settings) as d:
        own = f"http://{settings.http.listen}"
        evil = {"Origin": "https://evil.example"}
        # a page's fetch(mode: "no-cors") or form: no JSON content type, another origin
        alert = json.dumps(make_alert("csrf-1")).encode()
        async with d.http.post(f"{d.base_url}/v1/alerts", data=alert, headers=evil) as response:
            assert response.status == 403
            assert (await response.json())["field"] == "Origin"
        form = b'{"alert_id":"csrf-1","rule":"fire","label":"false","note":"="}\r\n'
        headers = {**evil, "Content-Type": "text/plain"}
        async with d.http.post(f"{d.base_url}/v1/feedback", data=form, headers=headers) as r:
            assert r.status == 403
        # DNS rebinding: the page's own name, pointed at 127.0.0.1
        rebound = {"Host": "rebind.evil.example:8080"}
        async with d.http.get(f"{d.base_url}/v1/alerts", headers=rebound) as response:
            assert response.status == 403
            assert (await response.json())["field"] == "Host"
        async with d.http.put(
            f"{d.base_url}/v1/rules/zz-evil", data=rule.encode(), headers=rebound
        ) as response:
            assert response.status == 403
        assert not (settings.rules.dir / "zz-evil.toml").exists()
        assert (await d.get_alert("csrf-1"))[0] == 404
        # the console's own requests, and clients that are no browser, go through
        async with d.http.post(
            f"{d.base_url}/v1/alerts", data=alert, headers={"Origin": own}
        ) as response:
            assert response.status == 202
        for host in ("localhost", "[::1]", socket.gethostname()):
            async with d.http.get(f"{d.base_url}/healthz", headers={"Host": host}) as response:
                assert response.status == 200, host


async def test_with_tokens_the_origin_is_not_what_decides(tmp_path, tiny_model, monkeypatch):
    # behind a TLS proxy the console's origin is the proxy's: the token is what counts
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "tokens").write_text(TOKEN + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    settings = make_settings(
        tmp_path, broker=None, model=tiny_model, http={"tokens_file": "tokens"}
    )
    async with run_daemon(settings) as d:
        proxied = {"Origin": "https://gateway.plant.example", "Host": "gateway.plant.example"}
        async with d.http.get(f"{d.base_url}/v1/alerts", headers=proxied) as response:
            assert response.status == 401
        headers = {**proxied, "Authorization": f"Bearer {TOKEN}"}
        async with d.http.get(f"{d.base_url}/v1/alerts", headers=headers) as response:
            assert response.status == 200


def test_console_logs_show_no_local_variables_of_a_failing_handler():
    out = io.StringIO()
    configure_logging(LogSettings(format="console"), stream=out)
    given = TOKEN  # noqa: F841 (a local of the frame that fails, as a handler's token is)
    try:
        raise RuntimeError("handler failed")
    except RuntimeError:
        structlog.get_logger("test").exception("http handler failed")
    configure_logging(LogSettings(format="json"))
    assert "handler failed" in out.getvalue()
    assert TOKEN not in out.getvalue()
