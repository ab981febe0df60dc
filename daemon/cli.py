"""The `secondlook` command."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import sqlite3
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import structlog
from rich.console import Console
from rich.table import Table
from rich.text import Text

from daemon.config import ConfigError, Settings, load_settings
from daemon.entry import HELD, hold, release
from daemon.logs import configure_logging

if TYPE_CHECKING:
    from daemon.rules import ChoiceChecker

#: the architectures `bench --arch` knows (kept here so that --help needs no torch import)
ARCH_NAMES = ("qwen2-vl-2b", "qwen2-vl-7b", "qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen3-vl-2b")


def _settings(
    config: Path | None, *, model_path: str | None = None, rules_dir: Path | None = None
) -> Settings:
    """The config file's settings with the command line's overrides."""
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    updates = {}
    if model_path:
        updates["model"] = settings.model.model_copy(update={"path": model_path})
    if rules_dir is not None:
        updates["rules"] = settings.rules.model_copy(update={"dir": rules_dir})
    return settings.model_copy(update=updates)


def _review_inputs(paths: tuple[Path, ...], settings: Settings) -> list[Path]:
    """The alert files of `paths`, checked to exist with rules to review them."""
    from daemon.replay import alert_files

    if not settings.rules.dir.is_dir():
        raise click.ClickException(
            f"no rules directory at {settings.rules.dir} (give --rules DIR or set [rules] dir)"
        )
    if not (files := alert_files(paths)):
        where = ", ".join(str(path) for path in paths)
        raise click.ClickException(f"no alert files (*.json) in {where}")
    return files


def _offline(settings: Settings, scratch: str) -> Settings:
    """No broker, no HTTP, a journal of its own (in `scratch`): for commands that review
    without disturbing a running daemon."""
    updates = {
        "mqtt": settings.mqtt.model_copy(update={"enabled": False}),
        "http": settings.http.model_copy(update={"enabled": False}),
        "storage": settings.storage.model_copy(update={"dir": Path(scratch)}),
    }
    return settings.model_copy(update=updates)


def _aware_time(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """An ISO 8601 date or time; without an offset, UTC."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is no ISO 8601 date or time") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


CONFIG_OPTION = click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML config file (default: built-in defaults).",
)
MODEL_OPTION = click.option(
    "--model", "model_path", help="Hub id or local model directory (overrides the config)."
)


def _finite(_ctx: Any, _param: Any, value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise click.BadParameter("expected a number")
    return value


def _writable_dir(path: Path) -> None:
    """Check now, before any model loads, that `path` is or can become a folder to write
    into (it is made once there is something to write); else a one-line error."""
    found = path
    while not found.exists() and found.parent != found:
        found = found.parent
    if not found.is_dir() or not os.access(found, os.W_OK | os.X_OK):
        raise click.ClickException(f"cannot write into {path}: {found} is no writable folder")


def _known_failures(exc: BaseException) -> list[BaseException]:
    """The failures a user can act on (a model, plugin or credential that cannot be used)
    that `exc` is, or that an exception group holds only of; else none."""
    from daemon.app import StartupError
    from daemon.credentials import CredentialError
    from daemon.plugin_api import BackendUnusable, ModelLoadError
    from daemon.plugins import PluginError

    if isinstance(exc, BaseExceptionGroup):
        found = [_known_failures(inner) for inner in exc.exceptions]
        return [failure for each in found for failure in each] if all(found) else []
    known = (StartupError, ModelLoadError, PluginError, BackendUnusable, CredentialError)
    return [exc] if isinstance(exc, known) else []


class _Commands(click.Group):
    """Known failures end any command with one `error:` line each and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if not (failures := _known_failures(exc)):
                raise
            for failure in failures:
                click.echo(f"error: {failure}", err=True)
            ctx.exit(1)


@click.group(cls=_Commands)
@click.version_option(package_name="secondlook")
def main() -> None:
    """A local multimodal LLM takes a second look at the alerts of AI camera boxes."""
    if click.get_current_context().invoked_subcommand != "run":
        release()


@main.command()
@CONFIG_OPTION
@MODEL_OPTION
def run(config: Path | None, model_path: str | None) -> None:
    """Run the daemon: MQTT/HTTP in, rules, model, verdicts out."""
    import signal

    # until the event loop's handler is in place (held from the first moment when started
    # as a command): SIGHUP's default action ends the process
    signal.signal(signal.SIGHUP, hold)
    settings = _settings(config, model_path=model_path)
    from daemon.app import run_daemon

    configure_logging(settings.log)
    run_daemon(settings, lambda: _settings(config, model_path=model_path), early_hup=HELD)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@CONFIG_OPTION
@click.option(
    "--rules",
    "rules_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Rules directory (overrides the config).",
)
@MODEL_OPTION
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='One JSON per line instead of a table: {"file", "topic", "verdict"} or {"file", "error"}.',
)
@click.option(
    "--as-live",
    is_flag=True,
    help="Judge as the running daemon would: a rule's cooldown reuses the verdict of a repeat, "
    "and its max_age_s makes an alert older than that (now) stale. Default: every alert is "
    "judged afresh, however old.",
)
def replay(
    paths: tuple[Path, ...],
    config: Path | None,
    rules_dir: Path | None,
    model_path: str | None,
    as_json: bool,
    as_live: bool,
) -> None:
    """Run alert files (or directories of *.json) through the pipeline, without a broker."""
    from daemon.replay import ReplayRow, verdict_table
    from daemon.replay import replay as run_replay

    with tempfile.TemporaryDirectory(prefix="secondlook-replay-") as scratch:
        settings = _offline(_settings(config, model_path=model_path, rules_dir=rules_dir), scratch)
        files = _review_inputs(paths, settings)
        console = Console(stderr=True)
        configure_logging(settings.log.model_copy(update={"level": "warning"}), sys.stderr)

        def each_row(row: ReplayRow) -> None:  # --json: each line as soon as it is known
            click.echo(row.to_json())

        rows = asyncio.run(
            run_replay(
                settings,
                files,
                console,
                each_alone=not as_live,
                on_row=each_row if as_json else None,
            )
        )
    if not as_json:
        # piped: wide rows rather than wrapped cells
        out = Console() if sys.stdout.isatty() else Console(width=200)
        out.print(verdict_table(rows, settings.mqtt.shadow_prefix))
    if any(row.verdict is None for row in rows):
        sys.exit(1)


@main.command("eval")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--rules",
    "rules_dir",
    type=click.Path(exists=True, path_type=Path, file_okay=False),
    help="Rules directory (overrides the config).",
)
@CONFIG_OPTION
@MODEL_OPTION
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("eval-report"),
    show_default=True,
    help="Where report.json, sweep.png and calibration.png go.",
)
@click.option(
    "--target-miss-rate",
    default=0.05,
    show_default=True,
    type=click.FloatRange(0, 1),
    callback=_finite,
    help="Share of real alarms the best thresholds may reject.",
)
@click.option(
    "--target-precision",
    type=click.FloatRange(0, 1),
    callback=_finite,
    help="Prefer best thresholds whose confirmations are at least this share real.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON line, last.")
def eval_(
    directory: Path,
    rules_dir: Path | None,
    config: Path | None,
    model_path: str | None,
    out_dir: Path,
    target_miss_rate: float,
    target_precision: float | None,
    as_json: bool,
) -> None:
    """Run labelled alerts (files with "label": "real" | "false") through the rules; report
    accuracy, false alarms filtered, real alarms rejected, a threshold sweep and calibration."""
    from daemon.eval_plots import calibration_plot, sweep_plot
    from daemon.eval_run import evaluate, print_report

    _writable_dir(out_dir)  # before the model loads: not after every review is done
    with tempfile.TemporaryDirectory(prefix="secondlook-eval-") as scratch:
        settings = _offline(_settings(config, model_path=model_path, rules_dir=rules_dir), scratch)
        files = _review_inputs((directory,), settings)
        configure_logging(settings.log.model_copy(update={"level": "warning"}), sys.stderr)
        result = asyncio.run(
            evaluate(
                settings,
                files,
                Console(stderr=True),
                target_miss_rate=target_miss_rate,
                target_precision=target_precision,
            )
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(result, indent=1))
    sweep_plot(result, out_dir / "sweep.png")
    calibration_plot(result, out_dir / "calibration.png")
    if as_json:
        click.echo(json.dumps(result))
    else:
        # piped: wide rows rather than wrapped cells
        print_report(result, Console() if sys.stdout.isatty() else Console(width=220), out_dir)
    if not result["rules"]:
        click.echo("error: no labelled alert was judged by a rule: nothing was measured", err=True)
        sys.exit(1)


@main.command("export-dataset")
@CONFIG_OPTION
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Where dataset.json and images/ go (an earlier export there is replaced).",
)
@click.option("--rules", "rule_names", multiple=True, help="Only these rules (repeatable).")
@click.option(
    "--since",
    callback=_aware_time,
    help="Only feedback given from then on: an ISO 8601 date or time (without an offset: UTC).",
)
def export_dataset(
    config: Path | None, out_dir: Path, rule_names: tuple[str, ...], since: datetime | None
) -> None:
    """Feedback-labelled snapshots, their prompts and the right answers, as LLaVA-format
    instruction-tuning data (for LoRA fine-tuning)."""
    from rich.progress import Progress

    from daemon.export_dataset import ExportError, RuleNow, export
    from daemon.plugins import Registry, make_plugin_manager
    from daemon.rules import RuleBook

    settings = _settings(config)
    journal = settings.storage.dir / "journal.sqlite3"
    if not journal.exists():
        raise click.ClickException(f"no journal at {journal} ([storage] dir)")
    _writable_dir(out_dir)
    # this command reports on stdout itself: log lines (rules loaded ...) only when it fails
    configure_logging(settings.log.model_copy(update={"level": "warning"}), sys.stderr)
    # how each rule showed the model its snapshots: the samples show them alike
    pm = make_plugin_manager(plugins_dir=settings.plugins.dir)
    book = RuleBook(settings.rules.dir, Registry.collect(pm, settings).rule_kinds)
    if settings.rules.dir.is_dir():
        book.load()
    shown = {rule.name: RuleNow.of(rule) for rule in book.rules}
    console = Console(stderr=True)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("exporting", total=None)
        try:
            done = export(
                journal,
                out_dir,
                rules=rule_names,
                since=since,
                shown=shown,
                progress=lambda: progress.advance(task),
            )
        except sqlite3.Error as exc:
            raise click.ClickException(f"the journal {journal} cannot be read: {exc}") from exc
        except ExportError as exc:
            raise click.ClickException(str(exc)) from exc
        except OSError as exc:
            raise click.ClickException(f"cannot write into {out_dir}: {exc}") from exc
    click.echo(f"{done.samples} samples written to {out_dir / 'dataset.json'}")
    for reason, count in sorted(done.skipped.items()):
        click.echo(f"{count} left out: {reason}")
    for name in done.unknown_rules:
        click.echo(f"no feedback in the journal names the rule {name!r}", err=True)


@main.command("try")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--prompt", help="A prompt to try (verdict kind unless --kind says otherwise).")
@click.option("--kind", default="verdict", show_default=True, help="Rule kind for --prompt.")
@click.option(
    "--rule",
    "rule_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A rule file to try instead of --prompt.",
)
@click.option("--camera-id", default="playground", show_default=True)
@click.option("--event-type", help="The alert's event type (default: the rule's first).")
@click.option("--save-rule", "save_as", help="Save the rule into the config's rules dir as NAME.")
@CONFIG_OPTION
@MODEL_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of a table.")
def try_(
    image: Path,
    prompt: str | None,
    kind: str,
    rule_file: Path | None,
    camera_id: str,
    event_type: str | None,
    save_as: str | None,
    config: Path | None,
    model_path: str | None,
    as_json: bool,
) -> None:
    """Try a prompt or a rule on one image: verdict, P(real), fields, raw output, latency."""
    from daemon.playground import (
        RULE_NAME,
        RULE_NAME_RULE,
        PlaygroundError,
        prompt_rule_kind,
        rule_toml,
    )

    if (prompt is None) == (rule_file is None):
        raise click.UsageError("give either --prompt or --rule")
    if save_as is not None and prompt is not None and not event_type:
        raise click.UsageError(
            "--save-rule with --prompt needs --event-type: the alerts the saved rule reviews "
            "(else it would review every alert)"
        )
    if save_as is not None and not RULE_NAME.fullmatch(save_as):
        raise click.UsageError(f"--save-rule {save_as!r}: {RULE_NAME_RULE}")
    if prompt is not None:
        try:
            prompt_rule_kind(kind, "write a rule file and try it with --rule")
        except PlaygroundError as exc:
            raise click.UsageError(str(exc)) from exc
    if rule_file is not None:
        try:
            text = rule_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise click.ClickException(f"{rule_file} is no UTF-8 text: {exc.reason}") from exc
    else:
        # saved, the rule matches the event type it was tried on, not every alert
        event_types = [event_type] if event_type else ["*"]
        text = rule_toml(prompt or "", kind=kind, event_types=event_types)
    settings = _settings(config, model_path=model_path)
    configure_logging(settings.log.model_copy(update={"level": "warning"}), sys.stderr)
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="secondlook-try-") as scratch:
        try:
            result, saved = asyncio.run(
                _try(
                    _offline(settings, scratch),
                    text,
                    rule_file.stem if rule_file else None,
                    image.read_bytes(),
                    camera_id,
                    event_type,
                    save_as,
                    rule_file.parent if rule_file else settings.rules.dir,
                    settings.rules.dir,
                    console,
                )
            )
        except PlaygroundError as exc:
            raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(result))
    else:
        _print_try(result)
    if saved is not None:
        console.print(
            f"saved as {saved[0]}" + (" (it replaced the earlier file)" if saved[1] else ""),
            markup=False,
        )


async def _try(
    settings: Settings,
    text: str,
    name: str | None,
    image: bytes,
    camera_id: str,
    event_type: str | None,
    save_as: str | None,
    folder: Path,
    rules_dir: Path,
    console: Console,
) -> tuple[dict[str, Any], tuple[Path, bool] | None]:
    """The rule's result (the rule read as a file of `folder`, named `name`; None: made of
    a prompt), and where it was saved into `rules_dir` (and whether that replaced a file)."""
    from daemon.app import Daemon
    from daemon.images import ImageError, inspect_image
    from daemon.playground import (
        PLAYGROUND_RULE,
        PlaygroundError,
        load_rule,
        playground_alert,
        save_rule,
        try_rule,
    )

    # the rule under trial alone: the rules directory is not read
    empty = settings.storage.dir / "no-rules"
    empty.mkdir()
    daemon = Daemon(
        settings.model_copy(update={"rules": settings.rules.model_copy(update={"dir": empty})})
    )
    kinds = daemon.registry.rule_kinds
    is_file = name is not None
    name = name or PLAYGROUND_RULE
    # a mistake in the rule, the image or the alert is told before the model loads
    rule = load_rule(text, kinds, None, name, folder=folder, is_file=is_file)
    echo_of = settings.mqtt.echo_of
    if save_as is not None:
        load_rule(text, kinds, None, name, folder=rules_dir, is_file=is_file, check_topic=echo_of)
        _writable_dir(rules_dir)
    playground_alert(rule, camera_id=camera_id, event_type=event_type)
    try:
        inspect_image(image, max_pixels=settings.images.max_input_pixels)
    except ImageError as exc:
        raise PlaygroundError(f"image: {exc}") from exc
    pipeline = await daemon.open()
    try:
        with console.status(f"loading model {settings.model.path}"):
            await daemon.start_model()
        check = daemon.rules.check_choices
        rule = load_rule(text, kinds, check, name, folder=folder, is_file=is_file)
        result = await try_rule(
            pipeline.reviewer,
            rule,
            image,
            camera_id=camera_id,
            event_type=event_type,
            max_pixels=settings.images.max_input_pixels,
        )
        saved = None
        if save_as is not None:
            save_as = save_as.removesuffix(".toml")
            replaced = (rules_dir / f"{save_as}.toml").exists()
            try:
                written, _ = save_rule(rules_dir, save_as, text, kinds, check, check_topic=echo_of)
                saved = (written, replaced)
            except OSError as exc:
                where = exc.filename or rules_dir
                raise PlaygroundError(f"cannot write the rule into {where}: {exc}") from exc
    finally:
        await daemon.close()
    return result, saved


def _print_try(result: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None)
    for key in (
        "rule",
        "kind",
        "verdict",
        "confidence",
        "reason",
        "fields",
        "latency_ms",
        "model",
        "prompt",
        "raw",
    ):
        value = result[key]
        # prompts and model output are shown as they are, never read as markup
        table.add_row(key, Text(json.dumps(value) if isinstance(value, dict) else str(value)))
    Console().print(table)


@main.command()
@CONFIG_OPTION
def plugins(config: Path | None) -> None:
    """List the loaded plugins, the hooks each implements and what they register."""
    from daemon.plugins import Registry, describe_plugins, make_plugin_manager

    settings = _settings(config)
    pm = make_plugin_manager(plugins_dir=settings.plugins.dir)
    for info in describe_plugins(pm):
        click.echo(f"{info.name}  [{info.source}]")
        click.echo(f"    hooks: {', '.join(info.hooks) or '-'}")
    registry = Registry.collect(pm, settings)
    click.echo(f"rule kinds:    {', '.join(sorted(registry.rule_kinds))}")
    click.echo(f"alert formats: {', '.join(sorted(registry.alert_formats))}")
    click.echo(f"backends:      {', '.join(sorted(registry.backends))}")


#: the longest side a JPEG can have, and the most one side may outgrow the other (the
#: Qwen2-VL processors refuse 200:1)
JPEG_MAX_SIDE = 65_500
MAX_ASPECT = 100


def _size(_ctx: Any, _param: Any, value: str) -> tuple[int, int]:
    given = re.fullmatch(r"([0-9]+)x([0-9]+)", value.lower())
    if given is None:
        raise click.BadParameter("expected WIDTHxHEIGHT, e.g. 1920x1080")
    w, h = int(given[1]), int(given[2])
    if min(w, h) < 28:
        raise click.BadParameter("each side at least 28 pixels (one patch of the model)")
    if max(w, h) > JPEG_MAX_SIDE:
        raise click.BadParameter(f"a JPEG's sides are at most {JPEG_MAX_SIDE} pixels")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise click.BadParameter(f"one side at most {MAX_ASPECT} times the other")
    return w, h


#: the bench's options for a model (`--backend instant` runs none)
MODEL_BENCH_OPTIONS = (
    "arch",
    "model_path",
    "baseline_alerts",
    "baseline_new_tokens",
    "max_batch",
    "max_wait_ms",
    "device",
    "compile_model",
    "dtype",
)


def _option_name(context: click.Context, name: str) -> str:
    """How the command line spells a parameter (its longest option)."""
    param = next(p for p in context.command.params if p.name == name)
    return max(param.opts, key=len)


@main.command()
@click.option(
    "--backend",
    type=click.Choice(["model", "instant", "pipeline"]),
    default="model",
    show_default=True,
    help="model: the model path against the naive one; instant: the whole pipeline "
    "through a broker with a backend that answers at once; pipeline: the whole pipeline "
    "with the model (--model, or --arch saved as a snapshot first).",
)
@click.option(
    "--worker",
    type=click.Choice(["thread", "process"]),
    default="thread",
    show_default=True,
    help="With --backend pipeline: the model on a thread of the daemon or in its own process.",
)
@click.option(
    "--arch",
    type=click.Choice(sorted(ARCH_NAMES)),
    default="qwen2-vl-2b",
    show_default=True,
    help="Full-size architecture with random weights.",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(path_type=Path, file_okay=False),
    help="A snapshot directory instead of --arch.",
)
@click.option(
    "--image-size",
    default="1920x1080",
    show_default=True,
    callback=_size,
    help="Synthetic snapshots' size.",
)
@click.option(
    "--alerts",
    type=click.IntRange(1),
    default=None,
    help="How many alerts (default: 8 for the model, 2000 for instant and pipeline).",
)
@click.option(
    "--baseline-alerts",
    type=click.IntRange(1),
    default=None,
    help="Run the slow naive path on only the first N alerts (default: all).",
)
@click.option(
    "--baseline-new-tokens",
    type=click.IntRange(1, 1024),
    default=64,
    show_default=True,
    help="Tokens the naive path generates at most (random weights seldom stop early; "
    "3: as a trained model answering 'Yes.').",
)
@click.option(
    "--max-batch",
    type=click.IntRange(1, 512),
    default=None,
    help="Default: [model] max_batch's (16).",
)
@click.option(
    "--max-wait-ms",
    type=click.FloatRange(0, 1000),
    default=None,
    callback=_finite,
    help="Default: [model] max_wait_ms's (10).",
)
@click.option("--device", default="auto", show_default=True)
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model.")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
    default="auto",
    show_default=True,
)
@click.option(
    "--json", "as_json", is_flag=True, help="Also print one JSON object as the last line."
)
def bench(
    backend: str,
    worker: str,
    arch: str,
    model_path: Path | None,
    image_size: tuple[int, int],
    alerts: int | None,
    baseline_alerts: int | None,
    baseline_new_tokens: int,
    max_batch: int | None,
    max_wait_ms: float | None,
    device: str,
    compile_model: bool,
    dtype: str,
    as_json: bool,
) -> None:
    """Measure: verdicts per second and latency, secondlook against the naive path."""
    from rich.progress import Progress

    if worker == "process" and backend != "pipeline":
        raise click.UsageError("--worker process goes with --backend pipeline")
    context = click.get_current_context()
    given = [
        name
        for name in MODEL_BENCH_OPTIONS
        if context.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None)
    ]
    if "model_path" in given and "arch" in given:
        raise click.UsageError("--arch and --model are alternatives: give one")
    if backend == "instant" and given:
        options = ", ".join(_option_name(context, name) for name in given)
        raise click.UsageError(f"--backend instant runs no model: leave out {options}")
    naive = [name for name in ("baseline_alerts", "baseline_new_tokens") if name in given]
    if backend == "pipeline" and naive:
        options = ", ".join(_option_name(context, name) for name in naive)
        raise click.UsageError(f"--backend pipeline runs no naive path: leave out {options}")
    from daemon.config import ImageSettings, ModelSettings

    limit = ImageSettings().max_input_pixels  # the daemon would refuse every snapshot
    if image_size[0] * image_size[1] > limit:
        raise click.UsageError(
            f"--image-size {image_size[0]}x{image_size[1]} is over the daemon's "
            f"[images] max_input_pixels ({limit})"
        )

    configure_logging(Settings().log.model_copy(update={"level": "warning"}))
    console = Console(stderr=True)
    with Progress(console=console, transient=True) as bars:

        def progress(name: str, total: int) -> Callable[[], None]:
            task = bars.add_task(name, total=total)
            return lambda: bars.advance(task)

        batching = {"max_batch": max_batch, "max_wait_ms": max_wait_ms}
        if backend in ("instant", "pipeline"):
            from daemon.bench_model import write_random_snapshot
            from daemon.bench_pipeline import run_pipeline_bench

            count = alerts or 2000
            with tempfile.TemporaryDirectory(prefix="secondlook-model-") as scratch:
                model = None
                if backend == "pipeline":
                    if model_path is None:
                        with console.status(f"writing a random {arch} snapshot"):
                            model_path = write_random_snapshot(
                                arch, Path(scratch) / arch, device, dtype
                            )
                    model = {
                        "backend": "transformers",
                        "path": str(model_path),
                        "device": device,
                        "dtype": dtype,
                        "compile": compile_model,
                        "worker": worker,
                        **{key: value for key, value in batching.items() if value is not None},
                    }
                verdicts = bars.add_task("verdicts", total=count)
                result = asyncio.run(
                    run_pipeline_bench(
                        count,
                        image_size,
                        lambda done: bars.update(verdicts, completed=done),
                        model,
                    )
                )
        else:
            from daemon.bench_model import model_from, run_model_bench

            settings = ModelSettings(
                device=device,
                dtype=dtype,
                compile=compile_model,
                **{key: value for key, value in batching.items() if value is not None},
            )
            with console.status(f"building {model_path or arch}"):
                runner = model_from(model_path, None if model_path else arch, settings)
            result = run_model_bench(
                runner,
                alerts or 8,
                image_size,
                settings,
                progress,
                baseline_alerts,
                baseline_new_tokens,
            )
    _print_bench(result)
    if as_json:
        click.echo(json.dumps(result))


def _print_bench(result: dict[str, Any]) -> None:
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=160)
    if "stages" in result:
        table = Table(
            title=f"pipeline, {result['model'] or 'instant'} backend"
            f"{' in a process' if result['worker'] == 'process' else ''}: "
            f"{result['alerts_per_s']} alerts/s "
            f"({result['alerts']} alerts of {result['image_size']}, "
            f"{result['daemon_cpu_ms_per_alert']} ms daemon CPU per alert, "
            f"{result['duplicates']} verdicts received twice)"
        )
        for column in ("stage", "count", "total s", "mean ms"):
            table.add_column(column)
        for stage, row in result["stages"].items():
            table.add_row(stage, str(row["count"]), str(row["total_s"]), str(row["mean_ms"]))
        console.print(table)
        table = Table(
            title=f"CPU ms per alert ({result['cores']} cores, {result['cpu_busy_pct']} % busy; "
            f"all busy at {result['cpu_bound_alerts_per_s']} alerts/s)"
        )
        table.add_column("where")
        table.add_column("ms")
        for where, ms in result["cpu_ms_per_alert"].items():
            table.add_row(where, str(ms))
    else:
        table = Table(
            title=f"{result['snapshot']} on {result['device']}: speed-up x{result['speedup']}"
        )
        keys = (
            "alerts_per_s",
            "p50_ms",
            "p95_ms",
            "p99_ms",
            "peak_rss_mb",
            "peak_gpu_mb",
            "visual_tokens",
            "mean_batch",
            "model_busy_pct",
        )
        table.add_column("")
        for key in keys:
            table.add_column(key)
        for side in ("baseline", "secondlook", "light_load"):
            table.add_row(side, *(str(result[side].get(key, "")) for key in keys))
    console.print(table)


@main.group()
def rules() -> None:
    """Work with rule files."""


@rules.command("check")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@CONFIG_OPTION
@click.option(
    "--model",
    "model_path",
    help="Also check that the model's tokenizer tells each rule's answers apart (classify labels).",
)
def rules_check(directory: Path, config: Path | None, model_path: str | None) -> None:
    """Validate every *.toml in DIRECTORY; exit 1 naming each bad file. With --config, rule
    kinds of the config's [plugins] dir are known too, and classify labels are checked as
    its model would (the openai backend's rule; a transformers model's tokenizer when it is
    a directory or downloaded already)."""
    from daemon.plugins import Registry, make_plugin_manager
    from daemon.rules import RuleBook

    # this command reports on stdout/stderr itself: no log lines
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    settings = _settings(config)
    check_choices: ChoiceChecker | None = None
    if model_path:
        check_choices = _tokenizer_check(model_path)
    elif config is not None:
        check_choices = _configured_check(settings)
    kinds = Registry.collect(make_plugin_manager((), settings.plugins.dir), settings).rule_kinds
    book = RuleBook(directory, kinds, check_choices, check_topic=settings.mqtt.echo_of)
    errors = book.load()
    for rule in book.rules:
        click.echo(
            f"ok    {rule.path}  rule={rule.name} kind={rule.kind} "
            f"events={','.join(rule.match.event_types)}"
        )
    for error in errors:
        click.echo(f"error {error}", err=True)
    if not book.rules and not errors:
        click.echo(f"no *.toml rule files in {directory}", err=True)
    if errors:
        sys.exit(1)


def _tokenizer_check(model_path: str, *, downloaded_only: bool = False) -> ChoiceChecker:
    """Classify labels checked against a model's tokenizer (`downloaded_only`: a hub id's
    from the local cache, nothing downloaded)."""
    from transformers import AutoTokenizer

    from daemon.inference.runner import choice_token_ids

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=downloaded_only)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot load the tokenizer of {model_path!r}: {exc}") from exc
    return lambda choices: choice_token_ids(tokenizer, choices)


def _configured_check(settings: Settings) -> ChoiceChecker | None:
    """The label check of the config's backend, as far as it can be made without starting
    it; None (said on stderr) where it cannot."""
    model = settings.model
    if model.backend == "openai":
        from daemon.inference.openai_backend import check_remote_choices

        return check_remote_choices
    if model.backend == "transformers":
        try:
            return _tokenizer_check(model.path, downloaded_only=True)
        except click.ClickException as exc:
            click.echo(f"note: labels not checked against the model: {exc.message}", err=True)
    return None


@main.command("tiny-model")
@click.argument("out_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--family",
    type=click.Choice(["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]),
    default="qwen2-vl",
    show_default=True,
)
def tiny_model(out_dir: Path, family: str) -> None:
    """Write a tiny random model (hub snapshot layout) for offline tests and demos.

    Its answers are noise; it exercises the real loading and inference code.
    """
    from transformers.utils import logging as hf_logging

    from daemon.inference.synthetic import build_tiny_model

    _writable_dir(out_dir)
    hf_logging.disable_progress_bar()
    try:
        build_tiny_model(out_dir, family)
    except OSError as exc:
        raise click.ClickException(f"cannot write into {out_dir}: {exc.strerror or exc}") from None
    click.echo(str(out_dir))
