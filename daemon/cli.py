"""The `secondlook` command."""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
from pathlib import Path

import click
import structlog
from rich.console import Console

from daemon.config import ConfigError, Settings, load_settings
from daemon.logs import configure_logging


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


CONFIG_OPTION = click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML config file (default: built-in defaults).",
)
MODEL_OPTION = click.option(
    "--model", "model_path", help="Hub id or local model directory (overrides the config)."
)


@click.group()
@click.version_option(package_name="secondlook")
def main() -> None:
    """A local multimodal LLM takes a second look at the alerts of AI camera boxes."""


@main.command()
@CONFIG_OPTION
@MODEL_OPTION
def run(config: Path | None, model_path: str | None) -> None:
    """Run the daemon: MQTT/HTTP in, rules, model, verdicts out."""
    settings = _settings(config, model_path=model_path)
    from daemon.app import StartupError, run_daemon
    from daemon.plugin_api import ModelLoadError
    from daemon.plugins import PluginError

    configure_logging(settings.log)
    try:
        run_daemon(settings)
    except* (StartupError, ModelLoadError, PluginError) as group:
        for exc in group.exceptions:
            click.echo(f"error: {exc}", err=True)
        sys.exit(1)


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
def replay(
    paths: tuple[Path, ...],
    config: Path | None,
    rules_dir: Path | None,
    model_path: str | None,
    as_json: bool,
) -> None:
    """Run alert files (or directories of *.json) through the pipeline, without a broker."""
    from daemon.replay import alert_files, verdict_table
    from daemon.replay import replay as run_replay

    settings = _settings(config, model_path=model_path, rules_dir=rules_dir)
    files = alert_files(paths)
    with tempfile.TemporaryDirectory(prefix="secondlook-replay-") as scratch:
        # no broker, no HTTP, a journal of its own: every file is reviewed afresh
        updates = {
            "mqtt": settings.mqtt.model_copy(update={"enabled": False}),
            "http": settings.http.model_copy(update={"enabled": False}),
            "storage": settings.storage.model_copy(update={"dir": Path(scratch)}),
        }
        settings = settings.model_copy(update=updates)
        console = Console(stderr=True)
        configure_logging(settings.log.model_copy(update={"level": "warning"}), sys.stderr)
        rows = asyncio.run(run_replay(settings, files, console))
    if as_json:
        for row in rows:
            click.echo(row.to_json())
    else:
        # piped: wide rows rather than wrapped cells
        out = Console() if sys.stdout.isatty() else Console(width=200)
        out.print(verdict_table(rows, settings.mqtt.shadow_prefix))
    if any(row.verdict is None for row in rows):
        sys.exit(1)


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


@main.group()
def rules() -> None:
    """Work with rule files."""


@rules.command("check")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--model",
    "model_path",
    help="Also check that the model's tokenizer tells each rule's answers apart (classify labels).",
)
def rules_check(directory: Path, model_path: str | None) -> None:
    """Validate every *.toml in DIRECTORY; exit 1 naming each bad file."""
    from daemon.plugins import Registry, make_plugin_manager
    from daemon.rules import ChoiceChecker, RuleBook

    # this command reports on stdout/stderr itself: no log lines
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    check_choices: ChoiceChecker | None = None
    if model_path:
        from transformers import AutoTokenizer

        from daemon.inference.runner import choice_token_ids

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        check_choices = lambda choices: choice_token_ids(tokenizer, choices)  # noqa: E731
    kinds = Registry.collect(make_plugin_manager()).rule_kinds
    book = RuleBook(directory, kinds, check_choices)
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

    hf_logging.disable_progress_bar()
    build_tiny_model(out_dir, family)
    click.echo(str(out_dir))
