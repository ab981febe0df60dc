"""The rules directory: load and validate files, keep last good versions, pick rules per alert."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel, ValidationError

from daemon.config import describe_validation_error, key_path
from daemon.contract import Alert, problem_text
from daemon.plugin_api import RuleKind
from daemon.rule_file import CooldownSpec, ImageMode, MatchSpec, RuleFile
from daemon.rules_saved import SavedRules
from daemon.templates import Template, check_topic_template, render_prompt

log = structlog.get_logger(__name__)

#: a rule file larger than this is refused unread (a rule is a few hundred bytes; every reload
#: parses every file on the event loop)
RULE_FILE_MAX_BYTES = 1024 * 1024

#: checks that a kind's answers can be told apart by their first token (the model's tokenizer)
ChoiceChecker = Callable[[Mapping[str, Sequence[str]]], None]
#: why verdicts on a rule's publish topic (its template, and whether the rule is a shadow)
#: would come back to the daemon as input, or None (see MqttSettings.echo_of)
TopicChecker = Callable[[str, bool], str | None]


@dataclass(frozen=True)
class Rule:
    """A validated rule, ready to match alerts."""

    name: str
    path: Path
    digest: str
    description: str
    enabled: bool
    priority: int
    exclusive: bool
    shadow: bool
    max_age_s: float | None
    match: MatchSpec
    kind: str
    prompt: Template
    on_error: str
    image: ImageMode
    crop_margin: float
    #: a LoRA adapter applied for this rule's reviews (None: the base model)
    adapter: Path | None
    options: BaseModel
    cooldown: CooldownSpec
    topic: Template | None

    def matches(self, alert: Alert) -> bool:
        return self.enabled and self.match.matches(alert)

    def prompt_for(self, alert: Alert) -> str:
        """The prompt with the alert's fields filled in (as plain text, never evaluated)."""
        return render_prompt(self.prompt, alert)


class RuleError(Exception):
    """A rule file that cannot be used: its path, where in it, and why."""

    def __init__(self, path: Path, where: str, reason: str) -> None:
        super().__init__(f"{path}: {where}: {reason}" if where else f"{path}: {reason}")
        self.path = path
        self.where = where
        self.reason = reason


def _toml_error_line(message: str, text: str) -> str:
    """tomllib reports "(at line 3, column 9)" or "(at end of document)" in its message."""
    found = re.search(r"at line (\d+), column (\d+)", message)
    if found:
        return f"line {found[1]}, column {found[2]}"
    return f"line {text.count(chr(10)) + 1} (end of file)"


def _validation_error(path: Path, exc: ValidationError, prefix: str = "") -> RuleError:
    first = exc.errors()[0]
    where = key_path(first["loc"], prefix)
    # the first problem is told after its key; any others, each on a line of its own
    others = describe_validation_error(exc, prefix=prefix).split("\n")[1:]
    return RuleError(path, where, "\n".join([problem_text(first), *others]))


def parse_rule(
    path: Path,
    text: str,
    kinds: Mapping[str, RuleKind],
    check_choices: ChoiceChecker | None = None,
    *,
    check_topic: TopicChecker | None = None,
) -> Rule:
    """Validate one rule file's text; raise RuleError naming the line or key at fault.
    `check_topic`: why verdicts on the rule's publish topic would come back, or None."""
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RuleError(path, _toml_error_line(str(exc), text), f"not valid TOML: {exc}") from exc
    except RecursionError as exc:
        raise RuleError(path, "", "not valid TOML: nested too deeply") from exc
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
    except Exception as exc:  # a kind's own validator failing otherwise
        raise RuleError(path, "review", f"kind {spec.review.kind!r} failed: {exc!r}") from exc
    review = spec.review
    adapter = _adapter_dir(path, review.adapter) if review.adapter else None
    rule = Rule(
        name=spec.name or path.stem,
        path=path,
        digest=hashlib.sha256(text.encode()).hexdigest()[:12],
        description=spec.description,
        enabled=spec.enabled,
        priority=spec.priority,
        exclusive=spec.exclusive,
        shadow=spec.shadow,
        max_age_s=spec.max_age_s,
        match=spec.match,
        kind=review.kind,
        prompt=Template.parse(review.prompt),
        on_error=review.on_error,
        image=review.image,
        crop_margin=review.crop_margin,
        adapter=adapter,
        options=options,
        cooldown=spec.cooldown,
        topic=check_topic_template(spec.publish.topic) if spec.publish.topic else None,
    )
    if (
        rule.topic is not None
        and check_topic
        and (echo := check_topic(rule.topic.text, rule.shadow))
    ):
        raise RuleError(path, "publish.topic", echo)
    choices = getattr(kind, "choices", None)
    if check_choices is not None and choices is not None:
        try:
            listed = choices(rule)
        except Exception as exc:
            raise RuleError(path, "review", f"kind {rule.kind!r} failed: {exc!r}") from exc
        try:
            check_choices(listed)
        except ValueError as exc:
            raise RuleError(path, "review", f"answers cannot be told apart: {exc}") from exc
    return rule


def rule_files(directory: Path) -> list[Path]:
    """The directory's `*.toml` files, by name, minus hidden ones (editors' lock and swap
    files); OSError when the directory cannot be listed."""
    with os.scandir(directory) as entries:
        names = [e.name for e in entries if e.name.endswith(".toml") and e.name[0] != "."]
    return [directory / name for name in sorted(names)]


def read_rule_text(path: Path) -> str:
    """A rule file's text; RuleError when it cannot be read, is no UTF-8 or is too large."""
    try:
        # O_NONBLOCK: a FIFO named *.toml must not block the event loop in open()
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise RuleError(path, "", "not a regular file")
            data = file.read(RULE_FILE_MAX_BYTES + 1)
    except OSError as exc:
        raise RuleError(path, "", f"cannot read: {exc.strerror or exc}") from exc
    if len(data) > RULE_FILE_MAX_BYTES:
        raise RuleError(path, "", f"over {RULE_FILE_MAX_BYTES} bytes: not a rule file")
    try:
        return data.decode("utf-8-sig")  # a byte order mark, as Windows editors write, is dropped
    except UnicodeDecodeError as exc:
        raise RuleError(path, "", f"not UTF-8 text: {exc.reason} at byte {exc.start}") from exc


def _adapter_dir(path: Path, value: str) -> Path:
    """The adapter directory, relative to the rule file's folder; checked to hold one."""
    try:
        adapter = (path.parent / value).resolve()
        found = (adapter / "adapter_config.json").is_file()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop; a NUL in the path
        raise RuleError(path, "review.adapter", f"{value}: cannot be followed: {exc}") from exc
    if not found:
        raise RuleError(
            path, "review.adapter", f"{adapter} is no LoRA adapter (no adapter_config.json)"
        )
    return adapter


def select_rules(candidates: Sequence[Rule]) -> list[Rule]:
    """The rules that review an alert, from those that match it.

    Highest `priority` first (then by name). Every matching rule reviews, except that once an
    `exclusive` rule is chosen, rules of lower priority are not. Shadow rules never exclude.
    """
    chosen: list[Rule] = []
    floor: int | None = None
    for rule in sorted(candidates, key=lambda r: (-r.priority, r.name)):
        if floor is not None and rule.priority < floor:
            continue
        chosen.append(rule)
        if rule.exclusive and not rule.shadow and floor is None:
            floor = rule.priority
    return chosen


def _same(old: Rule | None, new: Rule) -> bool:
    return old is not None and old.name == new.name and old.digest == new.digest


class RuleBook:
    """The rules of one directory. A file that breaks keeps its last good version (across
    restarts too, when given `saved`)."""

    def __init__(
        self,
        directory: Path,
        kinds: Mapping[str, RuleKind],
        check_choices: ChoiceChecker | None = None,
        saved: SavedRules | None = None,
        check_topic: TopicChecker | None = None,
    ) -> None:
        self.directory = directory
        self._kinds = kinds
        #: set once the model's tokenizer is known; rules are then re-checked
        self.check_choices = check_choices
        self.check_topic = check_topic
        self.saved = saved
        #: whether the checks are final (the model's tokenizer known, or none to come):
        #: only then are the rules in force saved as the last good ones
        self.final = saved is None
        self._by_path: dict[Path, Rule] = {}
        #: the text each rule in force was read from
        self._texts: dict[Path, str] = {}
        self.errors: list[RuleError] = []
        #: when the directory was last read, and when each rule's current version came in
        self.loaded_at: datetime | None = None
        self.since: dict[str, datetime] = {}

    @property
    def rules(self) -> list[Rule]:
        return sorted(self._by_path.values(), key=lambda rule: rule.name)

    def text_of(self, rule: Rule) -> str:
        """The text the rule in force was read from (its file's, or the last good one)."""
        return self._texts.get(rule.path, "")

    def get(self, name: str | None) -> Rule | None:
        return next((rule for rule in self._by_path.values() if rule.name == name), None)

    def load(self, *, recheck: bool = False) -> list[RuleError]:
        """(Re)read every `*.toml`; report and skip bad files; forget deleted ones.

        A file that breaks keeps its last good version: the one in force, or after a restart
        the one saved (if it passes today's checks). With `recheck` (the checks have
        changed) the last good version is judged afresh too. Two files may not name one rule:
        the file that already held the name keeps it.
        """
        try:
            paths = rule_files(self.directory)
        except OSError as exc:
            # the rules in force stay: a directory that cannot be read is not an empty one
            reason = exc.strerror or str(exc)
            if isinstance(exc, FileNotFoundError | NotADirectoryError):
                reason = "rules directory does not exist"
            self.errors = [RuleError(self.directory, "", reason)]
            log.error(
                "rules directory unreadable; the rules in force stay",
                path=str(self.directory),
                error=reason,
            )
            return self.errors
        parsed: dict[Path, Rule | RuleError] = {}
        texts: dict[Path, str] = {}
        for path in paths:
            try:
                texts[path] = read_rule_text(path)
                parsed[path] = self._parse(path, texts[path])
            except RuleError as exc:
                parsed[path] = exc
            except Exception as exc:  # anything else about this one file: it alone is refused
                parsed[path] = RuleError(path, "", f"cannot be read: {exc!r}")
        errors: list[RuleError] = []
        loaded: dict[Path, Rule] = {}
        names: dict[str, Path] = {}

        def claim_order(path: Path) -> tuple[int, Path]:
            """Files that keep the name they held first (a broken one keeps its last good
            version's), then files loaded before under another name, then newcomers: a
            file cannot take a name another file holds."""
            previous, rule = self._by_path.get(path), parsed[path]
            if previous is None:
                return 2, path
            keeps = isinstance(rule, RuleError) or rule.name == previous.name
            return (0 if keeps else 1), path

        for path in sorted(parsed, key=claim_order):
            previous = self._by_path.get(path)
            rule = parsed[path]
            if isinstance(rule, Rule) and rule.name in names:
                rule = RuleError(path, "name", f"rule {rule.name!r} already in {names[rule.name]}")
            if isinstance(rule, RuleError):
                errors.append(rule)
                kept, kept_text = self._last_good(path, texts.get(path), recheck) or (None, "")
                if kept is not None and kept.name in names:
                    kept = None  # its name is another file's now
                log.error(
                    "rule file rejected",
                    path=str(path),
                    where=rule.where,
                    reason=rule.reason,
                    action="keeping last good version" if kept else "skipped",
                    digest=kept.digest if kept else None,
                )
                if kept is not None:
                    loaded[path] = kept
                    names[kept.name] = path
                    texts[path] = kept_text
                continue
            if previous is None:
                log.info("rule loaded", rule=rule.name, path=str(path), digest=rule.digest)
            elif previous.digest != rule.digest:
                log.info(
                    "rule changed",
                    rule=rule.name,
                    path=str(path),
                    digest=rule.digest,
                    previous_digest=previous.digest,
                )
            loaded[path] = rule
            names[rule.name] = path
        for path in self._by_path.keys() - loaded.keys():
            removed = self._by_path[path]
            log.info("rule removed", rule=removed.name, path=str(path), digest=removed.digest)
        now = datetime.now(UTC)
        self.since = {
            rule.name: self.since.get(rule.name, now)
            if _same(self._by_path.get(path), rule)
            else now
            for path, rule in loaded.items()
        }
        self._by_path = loaded
        self._texts = {path: texts[path] for path in loaded}
        self.errors = errors
        self.loaded_at = now
        if self.saved is not None and self.final:
            self.saved.replace(self._texts)
        return errors

    def _parse(self, path: Path, text: str) -> Rule:
        return parse_rule(path, text, self._kinds, self.check_choices, check_topic=self.check_topic)

    def _last_good(self, path: Path, broken: str | None, recheck: bool) -> tuple[Rule, str] | None:
        """The version of a broken file that stays in force, and its text, if any: the one
        in force, else (judged afresh) the one saved before the restart."""
        previous = self._by_path.get(path)
        if previous is not None and not recheck:
            return previous, self._texts[path]
        saved = self.saved.get(path) if self.saved is not None else None
        for text in (self._texts.get(path), saved):
            if text is None or text == broken:
                continue
            try:
                return self._parse(path, text), text
            except Exception:  # no longer good under today's checks (or kinds)
                continue
        return None

    def match(self, alert: Alert) -> list[Rule]:
        """The rules that review this alert (see `select_rules`)."""
        return select_rules([rule for rule in self._by_path.values() if rule.matches(alert)])
