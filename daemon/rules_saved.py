"""Copies of the rule files last loaded, kept on disk so that a restart finds a rule's last
good version when its file broke while the daemon was down (or before it went down)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

#: the file, in the storage directory
SAVED_RULES_FILE = "rules-last-good.json"
_VERSION = 1


class SavedRules:
    """Rule file texts by path; written (atomically) only when they change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._texts = self._read()

    def get(self, rule_path: Path) -> str | None:
        return self._texts.get(str(rule_path))

    def replace(self, texts: dict[Path, str]) -> None:
        """Keep exactly these texts; a write that fails is logged and tried at the next
        change (the rules in force are not affected)."""
        new = {str(path): text for path, text in texts.items()}
        if new == self._texts:
            return
        try:
            self._write(new)
        except OSError as exc:
            log.error("saved rules not written", path=str(self.path), error=str(exc))
            return
        self._texts = new

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("saved rules unreadable: none used", path=str(self.path), error=str(exc))
            return {}
        files = data.get("files") if isinstance(data, dict) else None
        if not isinstance(files, dict) or data.get("version") != _VERSION:
            log.warning("saved rules of another form: none used", path=str(self.path))
            return {}
        return {k: v for k, v in files.items() if isinstance(k, str) and isinstance(v, str)}

    def _write(self, texts: dict[str, str]) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        with temporary.open("w", encoding="utf-8") as file:
            json.dump({"version": _VERSION, "files": texts}, file, ensure_ascii=False)
            file.flush()
            os.fsync(file.fileno())
        temporary.replace(self.path)
