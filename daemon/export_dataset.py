"""`secondlook export-dataset`: operators' feedback as instruction-tuning data.

Each alert with feedback on a rule's verdict becomes one LLaVA-format sample: its first
snapshot, the prompt the model was asked, and the answer it should have given —

- verdict rules: "yes" for a real alarm, "no" for a false one;
- classify rules: the corrected `fields.label`, or the model's label when it was right;
- extract rules: the corrected `fields` as JSON, or the model's fields when they were right.

dataset.json: [{"id", "image": "images/<id>.jpg", "conversations": [{"from": "human",
"value": "<image>\\n<prompt>"}, {"from": "gpt", "value": <answer>}]}], the layout LLaVA-style
LoRA trainers read. The journal is opened read-only: the daemon may keep running.
"""

from __future__ import annotations

import io
import json
import re
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image

#: the latest feedback per alert and rule, with that rule's latest verdict and first snapshot
QUERY = """
SELECT a.box_id, a.alert_id, f.rule, f.label, f.correct, f.fields AS corrected,
       f.created_at, v.payload, v.prompt, i.data
FROM feedback f
JOIN alerts a ON a.id = f.alert_ref
JOIN verdicts v ON v.id = (SELECT max(id) FROM verdicts WHERE alert_ref = f.alert_ref
                          AND rule = f.rule)
LEFT JOIN alert_images i ON i.alert_ref = f.alert_ref AND i.idx = 0
WHERE f.id IN (SELECT max(id) FROM feedback GROUP BY alert_ref, rule)
ORDER BY f.id
"""


@dataclass(frozen=True)
class Exported:
    samples: int
    #: reason -> how many feedback rows were left out for it
    skipped: dict[str, int]
    #: the rules asked for that no feedback in the journal names
    unknown_rules: list[str] = field(default_factory=list)


def kind_of(verdict: dict[str, Any]) -> str:
    """verdict, classify or extract, read from a published verdict."""
    fields = verdict.get("fields") or {}
    if "scores" in fields and "label" in fields:
        return "classify"
    if verdict.get("confidence") is None and verdict.get("verdict") != "unreviewed":
        return "extract"
    return "verdict"


def answer_for(row: sqlite3.Row, verdict: dict[str, Any]) -> str | None:
    """What the model should have answered; None when the feedback does not say."""
    kind = kind_of(verdict)
    corrected = json.loads(row["corrected"]) if row["corrected"] else None
    right = row["correct"] == 1
    if kind == "verdict":
        return {"real": "yes", "false": "no"}.get(row["label"] or "")
    if kind == "classify":
        if corrected and isinstance(corrected.get("label"), str):
            return str(corrected["label"])
        return str(verdict["fields"]["label"]) if right else None
    if corrected:
        return json.dumps(corrected, ensure_ascii=False, separators=(",", ":"))
    if right:
        return json.dumps(verdict.get("fields") or {}, ensure_ascii=False, separators=(",", ":"))
    return None


def sample_id(row: sqlite3.Row) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{row['box_id']}-{row['alert_id']}-{row['rule']}")


def rows(journal: Path) -> Iterator[sqlite3.Row]:
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        yield from db.execute(QUERY)
    finally:
        db.close()


def export(
    journal: Path,
    out: Path,
    *,
    rules: Sequence[str] = (),
    since: datetime | None = None,
    progress: Callable[[], None] = lambda: None,
) -> Exported:
    """Write out/dataset.json and out/images/ (replacing an earlier export's); answer what
    was written and what was not. `since`: feedback given from then on (aware datetime)."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    samples: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    named: set[str] = set()
    for row in rows(journal):
        progress()
        named.add(row["rule"])
        if rules and row["rule"] not in rules:
            continue
        if since and datetime.fromisoformat(row["created_at"]) < since:
            continue
        verdict = json.loads(row["payload"])
        answer = answer_for(row, verdict)
        if answer is None:
            skipped["the feedback does not give the right answer"] += 1
        elif not row["prompt"]:
            skipped["no prompt stored with the verdict"] += 1
        elif row["data"] is None:
            skipped["the snapshot was pruned"] += 1
        else:
            ident = sample_id(row)
            (images / f"{ident}.jpg").write_bytes(_as_jpeg(bytes(row["data"])))
            samples.append(
                {
                    "id": ident,
                    "image": f"images/{ident}.jpg",
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{row['prompt']}"},
                        {"from": "gpt", "value": answer},
                    ],
                }
            )
    (out / "dataset.json").write_text(json.dumps(samples, ensure_ascii=False, indent=1))
    written = {f"{sample['id']}.jpg" for sample in samples}
    for stale in images.glob("*.jpg"):  # an earlier export's: they would mix in
        if stale.name not in written:
            stale.unlink()
    return Exported(len(samples), dict(skipped), [name for name in rules if name not in named])


def _as_jpeg(data: bytes) -> bytes:
    if data.startswith(b"\xff\xd8"):
        return data
    with Image.open(io.BytesIO(data)) as img:
        buffer = io.BytesIO()
        img.convert("RGB").save(buffer, "JPEG", quality=95)
    return buffer.getvalue()
