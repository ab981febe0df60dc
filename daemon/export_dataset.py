"""`secondlook export-dataset`: operators' feedback as instruction-tuning data.

Each alert with feedback on a rule's verdict becomes one LLaVA-format sample: its snapshots
as the rule showed them to the model (the frame: its stored bytes where a JPEG needs no
turning by its EXIF Orientation, else decoded as for the model; for `boxes`, `crop` and
`crop+frame` rules the boxes drawn or the crop made again, at full resolution; the alert's
extra frames after them), the prompt the model was asked, and the answer it should have
given —

- verdict rules: "yes" for a real alarm, "no" for a false one;
- classify rules: the corrected `fields.label`, or the model's label when it was right;
- extract rules: the corrected `fields` as JSON, or the model's fields when they were right.

dataset.json: [{"id", "image": "images/<id>.jpg", "conversations": [{"from": "human",
"value": "<image>\\n<prompt>"}, {"from": "gpt", "value": <answer>}]}], the layout LLaVA-style
LoRA trainers read; a sample of several pictures lists them (`"image": [...]`) and opens its
prompt with as many `<image>` lines. A rule no longer in the rules directory is taken to
have shown the frame. The journal is opened read-only: the daemon may keep running. An
export replaces an earlier one in the same folder (the images its dataset.json lists; a
`.secondlook-export` file marks the folder as an export's), and refuses a folder whose
`images/` holds pictures of something else, or whose dataset.json another tool wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from daemon.images import Budget, ImageError, decode, orientation
from daemon.plugin_api import RawImage
from daemon.rule_file import ImageMode
from daemon.snapshots import SnapshotSet

#: the latest feedback per alert and rule, with that rule's latest verdict
QUERY = """
SELECT a.id AS ref, a.box_id, a.alert_id, a.alert, f.rule, f.label, f.correct,
       f.fields AS corrected, f.created_at, v.payload, v.prompt
FROM feedback f
JOIN alerts a ON a.id = f.alert_ref
JOIN verdicts v ON v.id = (SELECT max(id) FROM verdicts WHERE alert_ref = f.alert_ref
                          AND rule = f.rule)
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


@dataclass(frozen=True)
class RuleNow:
    """What an export needs of a rule in force: how it showed the model its snapshots, its
    kind, and (classify) the label each side holds when it holds one only."""

    image: ImageMode = "frame"
    crop_margin: float = 0.0
    kind: str | None = None
    #: "confirmed" / "rejected" -> the side's one label
    sole_labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, rule: Any) -> RuleNow:
        """The export's view of a rule of the rule book."""
        sole = {}
        if rule.kind == "classify":
            for verdict, labels in (
                ("confirmed", rule.options.confirm),
                ("rejected", rule.options.reject),
            ):
                if len(labels) == 1:
                    sole[verdict] = labels[0]
        return cls(rule.image, rule.crop_margin, rule.kind, sole)


#: the kinds whose answers an export can write
KNOWN_KINDS = ("verdict", "classify", "extract")


def kind_of(verdict: dict[str, Any]) -> str:
    """verdict, classify or extract, read from a published verdict (for a rule gone since)."""
    fields = verdict.get("fields") or {}
    if "scores" in fields and "label" in fields:
        return "classify"
    if verdict.get("confidence") is None and verdict.get("verdict") != "unreviewed":
        return "extract"
    return "verdict"


def answer_for(
    row: sqlite3.Row, verdict: dict[str, Any], rule: RuleNow | None = None
) -> str | None:
    """What the model should have answered; None when the feedback does not say."""
    kind = rule.kind if rule is not None and rule.kind else kind_of(verdict)
    corrected = json.loads(row["corrected"]) if row["corrected"] else None
    right = row["correct"] == 1
    if kind == "verdict":
        return {"real": "yes", "false": "no"}.get(row["label"] or "")
    if kind == "classify":
        if corrected and isinstance(corrected.get("label"), str):
            return str(corrected["label"])
        # "right" says the alert was real (or false) as the verdict said, not that its label
        # was the one: only where that side has one label (a rule gone since: taken as so)
        label = str((verdict.get("fields") or {}).get("label"))
        sole = rule.sole_labels.get(verdict.get("verdict", "")) if rule is not None else label
        return label if right and sole == label else None
    if corrected:
        return json.dumps(corrected, ensure_ascii=False, separators=(",", ":"))
    if right and verdict.get("verdict") == "confirmed":  # a valid extraction, said right
        return json.dumps(verdict.get("fields") or {}, ensure_ascii=False, separators=(",", ":"))
    return None


#: the readable part of a sample's id at most (ids of 256 characters each would make file
#: names past the file system's 255 bytes)
READABLE_MAX = 100


class ExportError(Exception):
    """An export that cannot be written where asked; the message says why."""


def sample_id(row: sqlite3.Row) -> str:
    """A file-safe id; the journal's row id keeps two alerts whose names read alike once
    made safe (box `a b` and `a_b`) apart. Long names are cut, with a digest of the whole."""
    readable = f"{row['box_id']}-{row['alert_id']}-{row['rule']}"
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", readable)
    if len(safe) > READABLE_MAX:
        digest = hashlib.sha256(readable.encode(errors="surrogatepass")).hexdigest()[:12]
        safe = f"{safe[:READABLE_MAX]}_{digest}"
    return f"{row['ref']}-{safe}"


def rows(journal: Path) -> Iterator[tuple[sqlite3.Row, Callable[[], list[bytes]]]]:
    """Each feedback row of QUERY, and how to read its alert's snapshots in order (only the
    rows exported need them)."""
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row

    def snapshots(ref: int) -> list[bytes]:
        """The alert's snapshots, or none when its frame is not stored (pruned, or fetched
        from `image_url` at review: the extra frames alone are no sample)."""
        found = db.execute(
            "SELECT source, data FROM alert_images WHERE alert_ref = ? ORDER BY idx", (ref,)
        ).fetchall()
        if not found or found[0]["source"] != "image":
            return []
        return [bytes(image["data"]) for image in found]

    try:
        for row in db.execute(QUERY).fetchall():
            yield row, partial(snapshots, row["ref"])
    finally:
        db.close()


def pictures(row: sqlite3.Row, snapshots: list[bytes], shown: RuleNow) -> list[bytes]:
    """The JPEGs of the pictures the rule showed the model (see the module's docstring)."""
    mode, margin = shown.image, shown.crop_margin
    if mode == "frame":
        return [_as_jpeg(data) for data in snapshots]
    boxes = [(b["x1"], b["y1"], b["x2"], b["y2"]) for b in json.loads(row["alert"])["boxes"]]
    raw = [RawImage("image", data) for data in snapshots]
    full_size = Budget(max_pixels=2**62, factor=1)  # as stored: trainers resize for themselves
    return [_jpeg(image) for image in SnapshotSet(raw, boxes, full_size).for_rule(mode, margin)]


#: the image files an export writes: its samples' ids (the journal's row id, a dash, the
#: rest) + .jpg
EXPORTED_IMAGE = re.compile(r"[0-9]+-[A-Za-z0-9_.-]+\.jpg")
#: beside an export's dataset.json: a dataset.json without it is another tool's, whose
#: pictures are none of an export's to replace
MARKER = ".secondlook-export"


def image_names(ident: str, count: int) -> list[str]:
    """A sample's image files: one, or numbered."""
    return [f"{ident}.jpg"] if count == 1 else [f"{ident}-{i}.jpg" for i in range(count)]


def export(
    journal: Path,
    out: Path,
    *,
    rules: Sequence[str] = (),
    since: datetime | None = None,
    shown: Mapping[str, RuleNow] | None = None,
    progress: Callable[[], None] = lambda: None,
) -> Exported:
    """Write out/dataset.json and out/images/ (replacing an earlier export's); answer what
    was written and what was not. `since`: feedback given from then on (aware datetime)."""
    images = out / "images"
    earlier = _earlier_images(out)
    images.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by secondlook export-dataset\n")
    written: set[str] = set()
    listing, partial = out / "dataset.json", out / ".dataset.json.partial"
    try:
        samples, skipped, named = _export(journal, images, written, rules, since, shown, progress)
        partial.write_text(json.dumps(samples, ensure_ascii=False, indent=1))
        partial.replace(listing)  # whole, or not at all
    except BaseException:
        # cut short (Ctrl-C, a full disk): the folder stays as the earlier export left it,
        # less the pictures both wrote, so that the next export is not refused
        for name in written - earlier:
            (images / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise
    for stale in earlier - written:  # an earlier export's: they would mix in
        (images / stale).unlink(missing_ok=True)
    return Exported(len(samples), dict(skipped), [name for name in rules if name not in named])


def _export(
    journal: Path,
    images: Path,
    written: set[str],
    rules: Sequence[str],
    since: datetime | None,
    shown: Mapping[str, RuleNow] | None,
    progress: Callable[[], None],
) -> tuple[list[dict[str, Any]], Counter[str], set[str]]:
    """Write the samples' pictures into `images` (their names added to `written` as they
    are); answer the samples, why rows were skipped, and the rules that gave any."""
    samples: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    named: set[str] = set()
    taken: set[str] = set()
    for row, read_snapshots in rows(journal):
        progress()
        named.add(row["rule"])
        if rules and row["rule"] not in rules:
            continue
        if since and datetime.fromisoformat(row["created_at"]) < since:
            continue
        verdict = json.loads(row["payload"])
        rule = (shown or {}).get(row["rule"])
        if rule is not None and rule.kind not in KNOWN_KINDS:
            skipped[f"a rule of kind {rule.kind!r}, whose answers an export cannot write"] += 1
            continue
        reviewed = verdict.get("verdict") != "unreviewed"  # (an unreviewed one shows no kind)
        if rule is not None and reviewed and kind_of(verdict) != rule.kind:
            # the prompt stored is of the kind it was: an answer of today's would not fit
            skipped["the rule's kind changed since the verdict"] += 1
            continue
        answer = answer_for(row, verdict, rule)
        if answer is None:
            skipped["the feedback does not give the right answer"] += 1
        elif not row["prompt"]:
            skipped["no prompt stored with the verdict"] += 1
        elif not (snapshots := read_snapshots()):
            skipped["the snapshot is not stored (pruned, or fetched from image_url)"] += 1
        else:
            try:
                jpegs = pictures(row, snapshots, rule or RuleNow())
            except ImageError as exc:
                skipped[f"the snapshot cannot be shown as the rule did: {exc}"] += 1
                continue
            ident = sample_id(row)
            # two rules whose names read alike once made safe, or whose file names meet
            # ("a" showing two pictures: a-0.jpg, a-1.jpg; "a-0" showing one: a-0.jpg)
            while ident in taken or written.intersection(image_names(ident, len(jpegs))):
                ident += "_"
            taken.add(ident)
            names = image_names(ident, len(jpegs))
            for name, jpeg in zip(names, jpegs, strict=True):
                (images / name).write_bytes(jpeg)
            written.update(names)
            paths = [f"images/{name}" for name in names]
            samples.append(
                {
                    "id": ident,
                    "image": paths[0] if len(paths) == 1 else paths,
                    "conversations": [
                        {"from": "human", "value": "<image>\n" * len(paths) + row["prompt"]},
                        {"from": "gpt", "value": answer},
                    ],
                }
            )
    return samples, skipped, named


def _earlier_images(out: Path) -> set[str]:
    """The image files of an earlier export in `out` (its dataset.json's); ExportError for
    an `images/` folder holding pictures no export of ours wrote."""
    try:
        samples = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        samples = []
    except (OSError, ValueError) as exc:
        raise ExportError(f"{out / 'dataset.json'} is no earlier export: {exc}") from exc
    names = _listed_images(samples)
    # without the marker, an export before there was one lists only names an export writes
    if samples and not (out / MARKER).exists() and (not isinstance(samples, list) or None in names):
        raise ExportError(
            f"{out / 'dataset.json'} is another tool's (no {MARKER} beside it): export into "
            "an empty folder"
        )
    # only names an export writes: a dataset.json edited to list "images/../x" must not have
    # the next export delete x
    listed = {name for name in names if name is not None}
    images = out / "images"
    others = sorted(p.name for p in images.glob("*") if p.name not in listed)
    if others:
        raise ExportError(
            f"{images} holds files of no earlier export ({', '.join(others[:3])}"
            f"{' ...' if len(others) > 3 else ''}): export into an empty folder"
        )
    return listed


def _listed_images(samples: Any) -> list[str | None]:
    """Each picture a dataset.json lists: its file name where an export would have written
    it (images/ + EXPORTED_IMAGE), else None."""
    found: list[str | None] = []
    for sample in samples if isinstance(samples, list) else []:
        paths = sample.get("image") if isinstance(sample, dict) else None
        for path in (
            [paths] if isinstance(paths, str) else paths if isinstance(paths, list) else [None]
        ):
            name = path.removeprefix("images/") if isinstance(path, str) else ""
            found.append(name if path != name and EXPORTED_IMAGE.fullmatch(name) else None)
    return found


def _as_jpeg(data: bytes) -> bytes:
    """A stored snapshot as the model saw it: its own bytes where a JPEG needs no turning,
    else decoded as for the model (upright, 16-bit grey scaled, transparent pixels white)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            as_stored = img.format == "JPEG" and orientation(img) == 1
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        as_stored = False  # decode says what is wrong
    return data if as_stored else _jpeg(decode(data))


def _jpeg(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.convert("RGB").save(buffer, "JPEG", quality=95)
    return buffer.getvalue()
