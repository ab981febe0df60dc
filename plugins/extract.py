"""Rule kind `extract`: generate a JSON object, validate it against the rule's fields."""

from __future__ import annotations

import json
import math
import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from daemon.contract import Alert, VerdictKind
from daemon.hookspecs import hookimpl
from daemon.plugin_api import MAX_NEW_TOKENS, Answer, GenerateQuery, Judgement, TextAnswer
from daemon.rules import Rule
from daemon.templates import without_control_tokens

FieldType = Literal["integer", "number", "boolean", "string"]


class FieldSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: FieldType
    description: str = ""
    required: bool = True

    @field_validator("description")
    @classmethod
    def _plain(cls, value: str) -> str:
        return without_control_tokens(value, "a field's description")


class ExtractOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    fields: dict[str, FieldSpec] = Field(min_length=1)
    #: None: the model's configured `max_new_tokens`
    max_new_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)

    @field_validator("fields")
    @classmethod
    def _plain_names(cls, fields: dict[str, FieldSpec]) -> dict[str, FieldSpec]:
        for name in fields:
            if not name.strip():
                raise ValueError("a field's name cannot be blank")
            without_control_tokens(name, f"field name {name!r}")
        return fields


def schema_instructions(fields: dict[str, FieldSpec]) -> str:
    lines = ["Reply with only one JSON object with these keys:"]
    for name, spec in fields.items():
        detail = f": {spec.description}" if spec.description else ""
        optional = ", may be null" if not spec.required else ""
        lines.append(f"- {name} ({spec.type}{optional}){detail}")
    return "\n".join(lines)


JSON_TYPES = {"integer": "integer", "number": "number", "boolean": "boolean", "string": "string"}


def json_schema(fields: dict[str, FieldSpec]) -> dict[str, Any]:
    """The JSON schema of the answer, for backends that constrain generation with it."""
    properties: dict[str, Any] = {}
    for name, spec in fields.items():
        kind: Any = JSON_TYPES[spec.type] if spec.required else [JSON_TYPES[spec.type], "null"]
        properties[name] = {
            "type": kind,
            **({"description": spec.description} if spec.description else {}),
        }
    return {
        "type": "object",
        "properties": properties,
        "required": list(fields),
        "additionalProperties": False,
    }


# where a JSON object can start: a brace, then a key or the closing brace
OBJECT_START = re.compile(r'\{\s*["}]')


def find_json_object(text: str) -> dict[str, Any]:
    """The first {...} object in the text (code fences and chatter around it, braces in the
    chatter included, are ignored)."""
    start = OBJECT_START.search(text)
    if start is None:
        raise ValueError("no JSON object in the output")
    try:
        value, _ = json.JSONDecoder().raw_decode(text[start.start() :])
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg} at char {exc.pos}") from exc
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def check_value(value: Any, kind: FieldType) -> Any:
    """The value if it has the field's type (an integral float counts as an integer)."""
    if kind == "boolean" and isinstance(value, bool):
        return value
    if kind == "string" and isinstance(value, str):
        return value
    if kind in ("integer", "number") and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value):  # NaN, Infinity, 1e999: no JSON
            if kind == "number":
                return value
            if value.is_integer():
                return int(value)
    raise ValueError(f"expected {kind}, got {json.dumps(value)[:40]}")


def _shown(name: str) -> str:
    """A name the model wrote, as text a verdict can carry (JSON's "\\ud83d" escapes decode to
    lone surrogates, which no UTF-8 holds: shown escaped)."""
    return name.encode("utf-8", "backslashreplace").decode()


def validate_fields(
    data: dict[str, Any], fields: dict[str, FieldSpec]
) -> tuple[dict[str, Any], list[str]]:
    """(valid fields, problems) for the model's object against the rule's fields."""
    valid: dict[str, Any] = {}
    problems: list[str] = []
    for name, spec in fields.items():
        if data.get(name) is None:
            if spec.required:
                problems.append(f"{name}: missing")
            else:
                valid[name] = None
            continue
        try:
            valid[name] = check_value(data[name], spec.type)
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
    problems += [f"{_shown(name)}: not a field of this rule" for name in data if name not in fields]
    return valid, problems


class JsonExtract:
    name: ClassVar[str] = "extract"
    Options: ClassVar[type[BaseModel]] = ExtractOptions

    def compose(self, alert: Alert, rule: Rule) -> GenerateQuery:
        options = rule.options
        assert isinstance(options, ExtractOptions)
        prompt = f"{rule.prompt_for(alert)}\n\n{schema_instructions(options.fields)}"
        return GenerateQuery(
            prompt=prompt,
            max_new_tokens=options.max_new_tokens,
            json_schema=json_schema(options.fields),
        )

    def interpret(self, answer: Answer, rule: Rule) -> Judgement:
        if not isinstance(answer, TextAnswer):
            raise TypeError(f"extract rules need generated text, got {type(answer).__name__}")
        options = rule.options
        assert isinstance(options, ExtractOptions)
        try:
            data = find_json_object(answer.text)
        except ValueError as exc:
            snippet = answer.text.strip()[:120]
            return Judgement(
                VerdictKind.UNCERTAIN, None, f"invalid model output: {exc}: {snippet!r}"
            )
        valid, problems = validate_fields(data, options.fields)
        if problems:
            reason = "invalid model output: " + "; ".join(problems)
            return Judgement(VerdictKind.UNCERTAIN, None, reason, valid)
        return Judgement(VerdictKind.CONFIRMED, None, f"extracted {len(valid)} fields", valid)


@hookimpl
def register_rule_kinds(register):
    register(JsonExtract())
