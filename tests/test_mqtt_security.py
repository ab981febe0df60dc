"""The daemon as systemd runs it against a broker that takes only TLS clients with a
certificate of our CA and a password: credentials from $CREDENTIALS_DIRECTORY, a refused
login retried without crashing, unusable files named at start, no password in the logs."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import aiomqtt
import pytest

from daemon.config import ConfigError, load_settings
from daemon.credentials import CredentialError
from daemon.mqtt import tls_context
from tests.conftest import FIRE_RULE, Broker, free_port, make_alert, make_settings
from tests.daemon_proc import log_path, run_to_exit, start, wait_http_ok, write_config
from tests.tls_broker import make_pki, openssl, tls_only_broker

PASSWORD = "Tls-pa55word-4f2a91-never-logged"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, broker and client certificates, plus a mismatched and an encrypted client key."""
    directory = tmp_path_factory.mktemp("pki")
    files = make_pki(directory)
    openssl("pkey", "-in", "client.key", "-aes256", "-passout", "pass:xyz",
            "-out", "client-encrypted.key", cwd=directory)  # fmt: skip
    files["client-encrypted.key"] = directory / "client-encrypted.key"
    return files


@pytest.fixture
def tls_broker(tmp_path: Path, pki: dict[str, Path]) -> Iterator[Broker]:
    """mosquitto: TLS only, a client certificate required, no anonymous login."""
    broker = tls_only_broker(tmp_path, pki, "gateway", PASSWORD)
    yield broker
    broker.stop()


def systemd_config(
    tmp_path: Path, broker: Broker, pki: dict[str, Path], model: Path, password: str
) -> Path:
    """A config whose password, client certificate and key are relative paths, found in the
    credentials directory that systemd's LoadCredential= fills (`credentials/`)."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "mqtt-password").write_text(password + "\n")
    for name in ("client.crt", "client.key"):
        shutil.copy(pki[name], credentials / name)
    config, _ = write_config(tmp_path, broker.port, model)
    login = (
        '[mqtt]\nusername = "gateway"\npassword_file = "mqtt-password"\n'
        f'tls_ca_file = "{pki["ca.crt"]}"\n'
        'tls_cert_file = "client.crt"\ntls_key_file = "client.key"\n'
        "reconnect_min_s = 0.2\nreconnect_max_s = 0.5\n"
    )
    config.write_text(config.read_text().replace("[mqtt]\n", login, 1))
    (tmp_path / "rules" / "fire.toml").write_text(FIRE_RULE)
    return config


def tls_client(broker: Broker, pki: dict[str, Path]) -> aiomqtt.Client:
    """An operator's client: the same CA, a client certificate and the right password."""
    params = aiomqtt.TLSParameters(
        ca_certs=str(pki["ca.crt"]), certfile=str(pki["client.crt"]), keyfile=str(pki["client.key"])
    )
    return aiomqtt.Client(
        "127.0.0.1", broker.port, username="gateway", password=PASSWORD, tls_params=params
    )


async def stop(proc: subprocess.Popen[bytes], config: Path) -> str:
    """SIGTERM; the daemon must exit 0. Returns its log."""
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 30) == 0
    return log_path(config).read_text()


async def test_verdicts_over_tls_with_credentials_from_the_credentials_directory(
    tmp_path, tls_broker, pki, tiny_model
):
    config = systemd_config(tmp_path, tls_broker, pki, tiny_model, PASSWORD)
    http = load_settings(config).http.listen
    proc = start(config, CREDENTIALS_DIRECTORY=str(tmp_path / "credentials"))
    try:
        async with tls_client(tls_broker, pki) as client:
            await client.subscribe("secondlook/verdicts/#", qos=1)
            await wait_http_ok(f"http://{http}", proc)
            await client.publish("secondlook/alerts/b", json.dumps(make_alert("tls-proc")), qos=1)
            async with asyncio.timeout(15):
                message = await anext(aiter(client.messages))
        verdict = json.loads(message.payload)  # type: ignore[arg-type]
        assert verdict["alert_id"] == "tls-proc" and verdict["rule"] == "fire"
        logged = await stop(proc, config)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "mqtt connected" in logged
    assert PASSWORD not in logged


async def test_a_refused_login_is_logged_retried_while_http_serves_and_mended_by_a_sighup(
    tmp_path, tls_broker, pki, tiny_model
):
    wrong = "wrong-pa55-77c1e0"
    config = systemd_config(tmp_path, tls_broker, pki, tiny_model, wrong)
    http = load_settings(config).http.listen
    proc = start(config, CREDENTIALS_DIRECTORY=str(tmp_path / "credentials"))
    try:
        deadline = time.monotonic() + 15
        while log_path(config).read_text().count("mqtt authorization failed") < 3:
            assert proc.poll() is None, log_path(config).read_text()
            assert time.monotonic() < deadline, log_path(config).read_text()
            await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{http}/healthz") as r:
                assert (await r.json())["mqtt"] == "disconnected"
            # the password file mended: read again on SIGHUP, used from the next try
            (tmp_path / "credentials" / "mqtt-password").write_text(PASSWORD + "\n")
            proc.send_signal(signal.SIGHUP)
            async with asyncio.timeout(15):
                while True:
                    async with session.get(f"http://{http}/healthz") as r:
                        if (await r.json())["mqtt"] == "connected":
                            break
                    await asyncio.sleep(0.1)
        async with tls_client(tls_broker, pki) as client:
            await client.subscribe("secondlook/verdicts/#", qos=1)
            await client.publish("secondlook/alerts/b", json.dumps(make_alert("mended")), qos=1)
            async with asyncio.timeout(15):
                message = await anext(aiter(client.messages))
        assert json.loads(message.payload)["alert_id"] == "mended"  # type: ignore[arg-type]
        logged = await stop(proc, config)
    finally:
        if proc.poll() is None:
            proc.kill()
    refused = [json.loads(line) for line in logged.splitlines() if "authorization failed" in line]
    assert refused[0]["level"] == "error" and refused[0]["username"] == "gateway"
    assert "not authorized" in refused[0]["error"].lower()
    assert wrong not in logged and PASSWORD not in logged


def test_a_missing_password_file_stops_the_start_naming_it(tmp_path, tiny_model):
    config, _ = write_config(tmp_path, free_port(), tiny_model)
    config.write_text(config.read_text().replace("[mqtt]\n", '[mqtt]\npassword_file = "pw"\n'))
    result = run_to_exit(config, CREDENTIALS_DIRECTORY=str(tmp_path / "creds"))
    assert result.returncode == 1
    assert f"error: cannot read [mqtt] password_file from {tmp_path / 'creds' / 'pw'}" in (
        result.stderr
    )


@pytest.mark.parametrize("key", ["tls_ca_file", "tls_cert_file", "tls_key_file"])
def test_a_missing_tls_file_is_named_with_its_key(tmp_path, pki, key):
    files = {
        "tls_ca_file": str(pki["ca.crt"]),
        "tls_cert_file": str(pki["client.crt"]),
        "tls_key_file": str(pki["client.key"]),
        key: str(tmp_path / "absent.pem"),
    }
    settings = make_settings(tmp_path, broker=None, model=tmp_path, mqtt=files)
    with pytest.raises(
        CredentialError, match=f"TLS files cannot be used: cannot read {key} from .*absent.pem"
    ):
        tls_context(settings.mqtt)


def test_unusable_tls_files_are_named(tmp_path, pki):
    def problem(**files: Path) -> str:
        mqtt = {key: str(path) for key, path in files.items()}
        settings = make_settings(tmp_path, broker=None, model=tmp_path, mqtt=mqtt)
        with pytest.raises(CredentialError) as caught:
            tls_context(settings.mqtt)
        return str(caught.value)

    (tmp_path / "junk.pem").write_text("not a certificate\n")
    assert "tls_ca_file" in problem(tls_ca_file=tmp_path / "junk.pem")
    mismatch = problem(tls_cert_file=pki["client.crt"], tls_key_file=pki["server.key"])
    assert f"tls_key_file {pki['server.key']} are not a certificate and its key" in mismatch
    # an encrypted key is refused at once instead of OpenSSL asking on the terminal
    encrypted = problem(tls_cert_file=pki["client.crt"], tls_key_file=pki["client-encrypted.key"])
    assert "client-encrypted.key is encrypted" in encrypted


def test_a_key_without_a_certificate_is_a_config_error(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[mqtt]\ntls_key_file = "client.key"\n')
    with pytest.raises(ConfigError, match="tls_key_file is set without tls_cert_file"):
        load_settings(config)
