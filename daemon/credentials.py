"""Secrets read from files, never from the config itself: the MQTT password, HTTP tokens,
the remote backend's API key.

A relative path is looked up in `$CREDENTIALS_DIRECTORY` when systemd set it
(`LoadCredential=name:/etc/secondlook/credentials/name` in the unit), else taken as it is.
"""

from __future__ import annotations

import os
from pathlib import Path


class CredentialError(Exception):
    """A credentials file that cannot be read; the message names the file, never its content."""


def credential_path(path: Path) -> Path:
    base = os.environ.get("CREDENTIALS_DIRECTORY")
    if base and not path.is_absolute():
        return Path(base) / path
    return path


def read_secret(path: Path, what: str) -> str:
    """The file's text without its trailing newline."""
    found = credential_path(path)
    try:
        text = found.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialError(f"cannot read {what} from {found}: {exc.__class__.__name__}") from exc
    if not text:
        raise CredentialError(f"{what} file {found} is empty")
    return text


def read_tokens(path: Path) -> list[str]:
    """One token per line; blank lines and `#` comments ignored."""
    lines = read_secret(path, "[http] tokens_file").splitlines()
    tokens = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not tokens:
        raise CredentialError(f"[http] tokens_file {credential_path(path)} holds no token")
    return tokens
