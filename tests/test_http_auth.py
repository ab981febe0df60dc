"""HTTP ingest behind bearer tokens read from a credentials file: who gets in, what the others
get back, what loading the config and starting refuse, and that no token reaches the log."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from daemon.config import ConfigError, LogSettings, load_settings
from daemon.logs import configure_logging
from tests.conftest import FIRE_RULE, make_alert, make_settings, run_daemon
from tests.daemon_proc import run_to_exit, write_config

TOKEN = "box-token-5be1c04d9a-never-logged"
NEAR_MISS = TOKEN[:-1] + "b"
TOKENS_FILE = f"# boxes of plant north\n{TOKEN}\n\n  # retired: old-token\nconsole-token\n"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def reviewed(http: aiohttp.ClientSession, url: str, timeout: float = 15) -> dict[str, Any]:
    """Poll an alert's URL (with the token) until its review is done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with http.get(url, headers=bearer(TOKEN)) as response:
            body = await response.json()
            if response.status == 200 and body["state"] == "reviewed":
                return body
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{url} not reviewed within {timeout}s")


async def test_only_a_listed_bearer_token_gets_in_and_none_is_logged(
    tmp_path, tiny_model, monkeypatch, capsys
):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "http-tokens").write_text(TOKENS_FILE)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    settings = make_settings(
        tmp_path,
        broker=None,
        model=tiny_model,
        http={"tokens_file": "http-tokens", "max_body_mb": 0.1},
        log={"level": "debug"},
    )
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    configure_logging(LogSettings(level="debug", format="json"))
    alert = make_alert("auth-ok")
    async with run_daemon(settings) as d, aiohttp.ClientSession() as http:
        url = f"{d.base_url}/v1/alerts"
        for headers in ({}, bearer(NEAR_MISS), bearer("# boxes of plant north"), bearer("")):
            async with http.post(url, json=alert, headers=headers) as response:
                assert response.status == 401, headers
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
                assert set(await response.json()) == {"error"}
        async with http.get(f"{d.base_url}/healthz") as response:
            assert response.status == 200
        async with http.post(url, json=alert, headers=bearer(TOKEN)) as response:
            assert response.status == 202
            link = (await response.json())["url"]
        assert (await reviewed(http, f"{d.base_url}{link}"))["verdicts"][0]["rule"] == "fire"
        # the scheme is case-insensitive; every listed token is accepted
        headers = {"Authorization": "bearer console-token"}
        async with http.get(f"{d.base_url}{link}", headers=headers) as response:
            assert response.status == 200
        # a right token does not lift the size limit
        big = json.dumps(make_alert("auth-big", note="x" * 200_000))
        headers = {**bearer(TOKEN), "Content-Type": "application/json"}
        async with http.post(url, data=big, headers=headers) as response:
            assert response.status == 413 and (await response.json())["field"] == "payload"
    logged = capsys.readouterr()
    output = logged.out + logged.err
    assert "http request with a wrong token" in output
    assert TOKEN not in output and NEAR_MISS not in output and "console-token" not in output


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:8080", "127.9.8.7:80", "localhost:8080", "[::1]:8080"]
)
def test_loopback_listen_needs_no_tokens(tmp_path, listen):
    config = tmp_path / "c.toml"
    config.write_text(f'[http]\nlisten = "{listen}"\n')
    assert load_settings(config).http.tokens_file is None


@pytest.mark.parametrize(
    "listen", ["0.0.0.0:8080", "[::]:8080", "192.168.1.20:8080", "gateway.plant.example:8080"]
)
def test_any_other_listen_needs_a_tokens_file(tmp_path, listen):
    config = tmp_path / "c.toml"
    config.write_text(f'[http]\nlisten = "{listen}"\n')
    with pytest.raises(ConfigError, match=r"http: .*set tokens_file"):
        load_settings(config)


def test_a_tokens_file_without_tokens_stops_the_start_naming_it(tmp_path, tiny_model):
    (tmp_path / "tokens").write_text("# nobody yet\n\n")
    config, _ = write_config(tmp_path, 1883, tiny_model)
    settings = config.read_text().replace("[mqtt]\n", "[mqtt]\nenabled = false\n")
    config.write_text(settings.replace("[http]\n", '[http]\ntokens_file = "tokens"\n'))
    result = run_to_exit(config, CREDENTIALS_DIRECTORY=str(tmp_path))
    assert result.returncode == 1
    assert f"error: [http] tokens_file {tmp_path / 'tokens'} holds no token" in result.stderr


async def test_reload_reads_the_tokens_file_again_and_a_bad_one_keeps_those_in_force(
    tmp_path, tiny_model, monkeypatch
):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    tokens = credentials / "http-tokens"
    tokens.write_text("old-token\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    settings = make_settings(
        tmp_path, broker=None, model=tiny_model, http={"tokens_file": "http-tokens"}
    )
    async with run_daemon(settings) as d, aiohttp.ClientSession() as http:

        async def status(token: str) -> int:
            async with http.get(f"{d.base_url}/v1/rules", headers=bearer(token)) as response:
                return response.status

        assert (await status("old-token"), await status("new-token")) == (200, 401)
        tokens.write_text("new-token\n")
        d.daemon.reload()  # what SIGHUP calls
        assert (await status("old-token"), await status("new-token")) == (401, 200)
        tokens.write_text("# emptied by mistake\n")
        with capture_logs() as logs:
            d.daemon.reload()
        assert (await status("new-token")) == 200
        assert any(e["event"].startswith("http tokens not re-read") for e in logs)
        # header bytes that are not UTF-8 are a wrong token, not a server error
        reader, writer = await asyncio.open_connection(*d.settings.http.listen.split(":"))
        writer.write(b"GET /v1/rules HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n\r\n")
        await writer.drain()
        assert (await reader.readline()).startswith(b"HTTP/1.1 401")
        writer.close()


def test_a_port_already_taken_stops_the_start_with_one_line(tmp_path, tiny_model):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    config, _ = write_config(tmp_path, 1883, tiny_model)
    text = config.read_text().replace("[mqtt]\n", "[mqtt]\nenabled = false\n")
    config.write_text(re.sub(r'listen = "[^"]*"', f'listen = "127.0.0.1:{port}"', text))
    with taken:
        result = run_to_exit(config)
    assert result.returncode == 1
    assert f"error: [http] listen = '127.0.0.1:{port}': cannot listen there: " in result.stderr
    assert "Traceback" not in result.stderr
