"""The prompt playground: one rule (a file's text, or a prompt and a kind) on one image,
judged by the same code as real reviews, with everything an operator wants to see; and
saving what works as a rule file the daemon then uses.

Used by `secondlook try` and by the web console (`POST /v1/try`, `PUT /v1/rules/{name}`).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
import tomllib
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from daemon.config import describe_validation_error
from daemon.contract import Alert, utc_now
from daemon.images import ImageError, inspect_image
from daemon.journal import StoredAlert
from daemon.plugin_api import RawImage, RuleKind
from daemon.review_gate import ReviewGate
from daemon.reviewer import Reviewer
from daemon.rules import (
    RULE_FILE_MAX_BYTES,
    ChoiceChecker,
    Rule,
    RuleError,
    TopicChecker,
    parse_rule,
    read_rule_text,
    rule_files,
)

#: a rule name: a safe file stem
RULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: what RULE_NAME asks for, in words
RULE_NAME_RULE = "1 to 64 letters, digits, '_', '-' and '.', starting with a letter or digit"
#: what a TOML basic string must escape besides quote and backslash: control characters
_TOML_ESCAPES = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_string(text: str) -> str:
    """`text` as a TOML basic string (any Unicode kept as it is; JSON's escapes are not
    TOML's: it writes characters beyond the BMP as surrogate pairs, which TOML forbids)."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


#: the name of a rule under trial that is no file (a prompt, a text sent to /v1/try)
PLAYGROUND_RULE = "playground"


class PlaygroundError(ValueError):
    """Input the playground cannot use; the message says what is wrong."""


class RuleFileExists(PlaygroundError):
    """A rule file of that name is there already (and was not to be replaced)."""


#: built-in rule kinds whose rules need more than a prompt (labels or fields)
KINDS_BEYOND_A_PROMPT = ("classify", "extract")


def prompt_rule_kind(kind: str, advice: str) -> str:
    """`kind`, for a rule made of a prompt alone; PlaygroundError (with `advice`: how to give
    the rest) for a kind that needs its labels or fields too."""
    if kind in KINDS_BEYOND_A_PROMPT:
        article = "an" if kind[0] in "aeiou" else "a"
        raise PlaygroundError(f"{article} {kind} rule needs its labels or fields: {advice}")
    return kind


def rule_toml(
    prompt: str,
    *,
    kind: str = "verdict",
    event_types: Sequence[str] = ("*",),
    description: str = "",
) -> str:
    """A rule file's text for a prompt (verdict kind; classify and extract rules need labels
    or fields: write those as TOML)."""
    if isinstance(event_types, str):
        event_types = [event_types]
    lines = [f"description = {toml_string(description)}"] if description else []
    lines += [
        "[match]",
        f"event_types = [{', '.join(toml_string(t) for t in event_types)}]",
        "[review]",
        f"kind = {toml_string(kind)}",
        f"prompt = {toml_string(prompt)}",
    ]
    return "\n".join(lines) + "\n"


def load_rule(
    text: str,
    kinds: Mapping[str, RuleKind],
    check_choices: ChoiceChecker | None = None,
    name: str = PLAYGROUND_RULE,
    *,
    folder: Path,
    is_file: bool = True,
    check_topic: TopicChecker | None = None,
) -> Rule:
    """A rule from its text, checked as the rules directory would check it, as a file of
    `folder` (what a relative `adapter` path is relative to). `is_file`: errors name the
    file (else only where in the rule: a prompt, a text sent to try)."""
    try:
        path = folder / f"{name}.toml"
        return parse_rule(path, text, kinds, check_choices, check_topic=check_topic)
    except RuleError as exc:
        if not is_file:  # where in the rule, not a path it never had
            raise PlaygroundError(
                f"{exc.where}: {exc.reason}" if exc.where else exc.reason
            ) from exc
        raise PlaygroundError(str(exc)) from exc


def playground_alert(
    rule: Rule,
    *,
    camera_id: str = "playground",
    event_type: str | None = None,
    boxes: Sequence[Mapping[str, float]] = (),
    like: Alert | None = None,
) -> Alert:
    """The alert a try judges: `like` (a stored alert) under a new id, or one made of the
    camera, event type (default: the rule's first plain one) and boxes given."""
    try_id = f"try-{uuid.uuid4().hex[:8]}"
    if like is not None:
        return like.model_copy(update={"alert_id": try_id, "box_id": "playground"})
    plain = [t for t in rule.match.event_types if not any(c in t for c in "*?[")]
    try:
        return Alert.model_validate(
            {
                "alert_id": try_id,
                "box_id": "playground",
                "camera_id": camera_id,
                "event_type": event_type or (plain[0] if plain else "playground"),
                "occurred_at": utc_now().isoformat(),
                "boxes": list(boxes),
            }
        )
    except ValidationError as exc:
        raise PlaygroundError(describe_validation_error(exc)) from exc


async def try_rule(
    reviewer: Reviewer,
    rule: Rule,
    image: bytes,
    *,
    camera_id: str = "playground",
    event_type: str | None = None,
    boxes: Sequence[Mapping[str, float]] = (),
    max_pixels: int = 40_000_000,
    like: Alert | None = None,
    gate: ReviewGate | None = None,
) -> dict[str, Any]:
    """The rule's judgement of the image, with the prompt, raw answer and latency; `like`:
    a stored alert whose fields (camera, event type, boxes, extra ...) the try takes; `gate`:
    the daemon's, so that the try waits while an alert is reviewed alone (a crash cut off
    its review: see daemon.review_gate), and a crash then is still that alert's alone."""
    try:
        inspect_image(image, max_pixels=max_pixels)
    except ImageError as exc:
        raise PlaygroundError(f"image: {exc}") from exc
    alert = playground_alert(
        rule, camera_id=camera_id, event_type=event_type, boxes=boxes, like=like
    )
    stored = StoredAlert(0, alert, [RawImage("image", image)], utc_now(), 0, "received")
    async with gate.review(alone=False) if gate is not None else contextlib.nullcontext():
        started = time.perf_counter()
        # a try neither reuses a verdict nor lends one to the live alerts of its camera
        judgement = await reviewer.judge(alert, rule, reviewer.images_once(stored), cooldown=False)
    latency_ms = round((time.perf_counter() - started) * 1000, 1)
    if judgement is None:  # on_error = "drop"
        raise PlaygroundError("the review failed and the rule drops failed alerts (on_error)")
    return {
        "rule": rule.name,
        "kind": rule.kind,
        "verdict": judgement.verdict.value,
        "confidence": judgement.confidence,
        "reason": judgement.reason,
        "fields": dict(judgement.fields),
        "prompt": judgement.prompt,
        "raw": judgement.raw,
        "latency_ms": latency_ms,
        "model": reviewer.backend.model_name,
    }


def save_rule(
    rules_dir: Path,
    name: str,
    text: str,
    kinds: Mapping[str, RuleKind],
    check_choices: ChoiceChecker | None = None,
    *,
    overwrite: bool = True,
    in_force: Mapping[str, Path] | None = None,
    check_topic: TopicChecker | None = None,
) -> tuple[Path, Rule]:
    """Check `text` as a rule, then write `<rules_dir>/<name>.toml` at once (a temporary file
    renamed over it), so the rules watcher never reads half a file. A rule whose name (its
    `name` key) another file of the directory holds, or another file's rule `in_force` (by
    name: a broken file's last good version), is refused: the directory would refuse it too
    (not when the rule in force under that name is the file saved over);
    so is one over the directory's size limit, and without `overwrite` an existing file
    (RuleFileExists). Any existing rule file's own name will do; `.toml` after it is dropped."""
    name = name.removesuffix(".toml")
    if not RULE_NAME.fullmatch(name) and not _is_rule_file(rules_dir, name):
        raise PlaygroundError(f"name {name!r}: {RULE_NAME_RULE}")
    if len(text.encode()) > RULE_FILE_MAX_BYTES:
        raise PlaygroundError(f"over {RULE_FILE_MAX_BYTES} bytes: not a rule file")
    rule = load_rule(text, kinds, check_choices, name, folder=rules_dir, check_topic=check_topic)
    target = rules_dir / f"{name}.toml"
    holder = (in_force or {}).get(rule.name)
    if holder == target:
        # the rule in force under that name is this file's: it keeps the name, whatever a
        # file the directory refused says (that file's own error is shown)
        holder = None
    elif holder is None:
        holder = _file_naming(rules_dir, rule.name, besides=target)
    if holder is not None:  # before the question whether to replace the file: no use asking
        raise PlaygroundError(f"rule {rule.name!r} is already in {holder.name}")
    if not overwrite and target.exists():
        raise RuleFileExists(f"{target.name} exists")
    rules_dir.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=rules_dir, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text if text.endswith("\n") else text + "\n")
        Path(temporary).chmod(0o644)  # as a file written by hand: the daemon's user reads it
        Path(temporary).replace(target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target, rule


def _is_rule_file(rules_dir: Path, name: str) -> bool:
    """Whether `<name>.toml` is one of the directory's rule files (a name such as "明火"
    or "fire rule" that the console may save over, though a new file may not take it)."""
    try:
        return any(path.stem == name for path in rule_files(rules_dir))
    except OSError:
        return False


def _file_naming(rules_dir: Path, name: str, *, besides: Path) -> Path | None:
    """Another rule file of the directory whose rule is called `name` (its `name` key, or
    its stem), if any; files that cannot be read name nothing."""
    try:
        paths = rule_files(rules_dir)
    except OSError:
        return None  # no directory yet
    for path in paths:
        if path.name == besides.name:
            continue
        try:
            declared = tomllib.loads(read_rule_text(path)).get("name", path.stem)
        except (RuleError, tomllib.TOMLDecodeError, RecursionError):
            continue
        if declared == name:
            return path
    return None
