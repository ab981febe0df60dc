"""Rule files: load and validate the rules directory, keep the last good version, match alerts."""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from daemon.config import describe_validation_error
from daemon.contract import Alert, Name
from daemon.plugin_api import RuleKind
from daemon.topics import check_topic_template

log = structlog.get_logger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MatchSpec(_Strict):
    """Which alerts a rule reviews: every list is a set of glob patterns."""

    event_types: list[Name] = Field(min_length=1)
    cameras: list[Name] = Field(default_factory=lambda: ["*"], min_length=1)
    boxes: list[Name] = Field(default_factory=lambda: ["*"], min_length=1)

    def matches(self, alert: Alert) -> bool:
        return (
            _any_glob(alert.event_type, self.event_types)
            and _any_glob(alert.camera_id, self.cameras)
            and _any_glob(alert.box_id, self.boxes)
        )


class ReviewSpec(BaseModel):
    """The keys of `[review]` every kind shares; the rest go to the kind's Options."""

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: str = "verdict"
    prompt: str = Field(min_length=1)
    on_error: Literal["forward", "drop"] = "forward"

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is blank")
        return value.strip()


class PublishSpec(_Strict):
    topic: str | None = None

    @field_validator("topic")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None:
            check_topic_template(value)
        return value


class RuleFile(_Strict):
    name: Name | None = None
    description: str = ""
    match: MatchSpec
    review: ReviewSpec
    publish: PublishSpec = Field(default_factory=PublishSpec)


@dataclass(frozen=True)
class Rule:
    """A validated rule, ready to match alerts."""

    name: str
    path: Path
    digest: str
    description: str
    match: MatchSpec
    kind: str
    prompt: str
    on_error: Literal["forward", "drop"]
    options: BaseModel
    topic: str | None

    def matches(self, alert: Alert) -> bool:
        return self.match.matches(alert)


class RuleError(Exception):
    """A rule file that cannot be used: its path, where in it, and why."""

    def __init__(self, path: Path, where: str, reason: str) -> None:
        super().__init__(f"{path}: {where}: {reason}" if where else f"{path}: {reason}")
        self.path = path
        self.where = where
        self.reason = reason


def _any_glob(value: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(value, pattern) for pattern in patterns)


def _toml_error_line(message: str, text: str) -> str:
    """tomllib reports "(at line 3, column 9)" or "(at end of document)" in its message."""
    found = re.search(r"at line (\d+), column (\d+)", message)
    if found:
        return f"line {found[1]}, column {found[2]}"
    return f"line {text.count(chr(10)) + 1} (end of file)"


def _validation_error(path: Path, exc: ValidationError, prefix: str = "") -> RuleError:
    first = exc.errors()[0]
    where = prefix + ".".join(str(part) for part in first["loc"])
    reasons = describe_validation_error(exc, prefix=prefix)
    return RuleError(path, where, first["msg"] if exc.error_count() == 1 else reasons)


def parse_rule(path: Path, text: str, kinds: Mapping[str, RuleKind]) -> Rule:
    """Validate one rule file's text; raise RuleError naming the line or key at fault."""
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RuleError(path, _toml_error_line(str(exc), text), f"not valid TOML: {exc}") from exc
    try:
        spec = RuleFile.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(path, exc) from exc
    kind = kinds.get(spec.review.kind)
    if kind is None:
        known = ", ".join(sorted(kinds)) or "none"
        raise RuleError(path, "review.kind", f"unknown kind {spec.review.kind!r}; known: {known}")
    try:
        options = kind.Options.model_validate(dict(spec.review.model_extra or {}))
    except ValidationError as exc:
        raise _validation_error(path, exc, prefix="review.") from exc
    return Rule(
        name=spec.name or path.stem,
        path=path,
        digest=hashlib.sha256(text.encode()).hexdigest()[:12],
        description=spec.description,
        match=spec.match,
        kind=spec.review.kind,
        prompt=spec.review.prompt,
        on_error=spec.review.on_error,
        options=options,
        topic=spec.publish.topic,
    )


def load_rule(path: Path, kinds: Mapping[str, RuleKind]) -> Rule:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleError(path, "", f"cannot read: {exc}") from exc
    return parse_rule(path, text, kinds)


class RuleBook:
    """The rules of one directory. A file that breaks keeps its last good version."""

    def __init__(self, directory: Path, kinds: Mapping[str, RuleKind]) -> None:
        self.directory = directory
        self._kinds = kinds
        self._by_path: dict[Path, Rule] = {}
        self.errors: list[RuleError] = []

    @property
    def rules(self) -> list[Rule]:
        return sorted(self._by_path.values(), key=lambda rule: rule.name)

    def load(self) -> list[RuleError]:
        """(Re)read every `*.toml`; report and skip bad files; forget deleted ones."""
        if not self.directory.is_dir():
            self.errors = [RuleError(self.directory, "", "rules directory does not exist")]
            log.error("rules directory missing", path=str(self.directory))
            return self.errors
        paths = sorted(self.directory.glob("*.toml"))
        errors: list[RuleError] = []
        loaded: dict[Path, Rule] = {}
        names: dict[str, Path] = {}
        for path in paths:
            try:
                rule = load_rule(path, self._kinds)
                if rule.name in names:
                    raise RuleError(
                        path, "name", f"rule {rule.name!r} already in {names[rule.name]}"
                    )
            except RuleError as exc:
                errors.append(exc)
                previous = self._by_path.get(path)
                kept = "keeping last good version" if previous else "skipped"
                log.error(
                    "rule file rejected",
                    path=str(path),
                    where=exc.where,
                    reason=exc.reason,
                    action=kept,
                )
                if previous is not None:
                    loaded[path] = previous
                    names[previous.name] = path
                continue
            if self._by_path.get(path) != rule:
                log.info(
                    "rule loaded",
                    rule=rule.name,
                    path=str(path),
                    digest=rule.digest,
                    kind=rule.kind,
                )
            loaded[path] = rule
            names[rule.name] = path
        for path in self._by_path.keys() - loaded.keys():
            log.info("rule removed", rule=self._by_path[path].name, path=str(path))
        self._by_path = loaded
        self.errors = errors
        return errors

    def match(self, alert: Alert) -> list[Rule]:
        """Every rule that matches, by name."""
        return [rule for rule in self.rules if rule.matches(alert)]
