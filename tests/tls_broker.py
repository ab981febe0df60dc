"""A certificate authority made with openssl, and a mosquitto that takes only TLS clients
with one of its certificates and a password."""

from __future__ import annotations

import getpass
import subprocess
from pathlib import Path

from tests.conftest import Broker


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(directory: Path) -> dict[str, Path]:
    """A CA, a broker certificate for 127.0.0.1 and a client certificate, all signed by it."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=directory)  # fmt: skip
    (directory / "san.ext").write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=directory)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", "san.ext",
                "-out", f"{name}.crt", cwd=directory)  # fmt: skip
    return {name: directory / name for name in
            ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}  # fmt: skip


def tls_only_broker(workdir: Path, pki: dict[str, Path], user: str, password: str) -> Broker:
    """Started: TLS only, a client certificate of the CA required, `user` / `password` the
    one login."""
    passwords = workdir / "mosquitto-passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), user, password], check=True)
    broker = Broker(workdir)
    broker.config.write_text(
        f"listener {broker.port} 127.0.0.1\n"
        f"cafile {pki['ca.crt']}\ncertfile {pki['server.crt']}\nkeyfile {pki['server.key']}\n"
        "require_certificate true\n"
        "allow_anonymous false\n"
        f"password_file {passwords}\n"
        f"log_dest file {workdir}/mosquitto.log\n"
        f"user {getpass.getuser()}\n"
    )
    broker.start()
    return broker
