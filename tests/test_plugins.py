"""Plugins: built-ins come in through the entry point group, like any third-party plugin."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import sys
import tomllib
import types
from typing import ClassVar

import pytest
from click.testing import CliRunner
from pydantic import BaseModel, ConfigDict, field_validator

from daemon import hookspecs
from daemon.cli import main
from daemon.contract import Alert, VerdictKind
from daemon.hookspecs import hookimpl
from daemon.plugin_api import ChoiceQuery, GenerateQuery, IncomingAlert, Judgement, RawImage
from daemon.plugins import ENTRY_POINT_GROUP, PluginError, Registry, make_plugin_manager
from daemon.rules import RuleError, parse_rule
from tests.conftest import (
    FIRE_RULE,
    ROOT,
    collect,
    make_alert,
    make_settings,
    publish,
    run_daemon,
)


def test_built_in_plugins_are_loaded_from_the_entry_point_group():
    pm = make_plugin_manager()
    loaded = {plugin.__name__ for plugin, dist in pm.list_plugin_distinfo()}
    assert {"plugins.canonical", "plugins.verdict", "plugins.extract"} <= loaded
    assert {dist.project_name for _, dist in pm.list_plugin_distinfo()} == {"secondlook"}
    registry = Registry.collect(pm)
    assert set(registry.rule_kinds) >= {"verdict", "extract"}
    assert "canonical" in registry.alert_formats and "transformers" in registry.backends
    assert ENTRY_POINT_GROUP == "secondlook"


class SmokeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threshold: float = 0.5


class SmokeKind:
    """A third-party rule kind: "is there smoke?" scored from the model's own yes/no."""

    name: ClassVar[str] = "smoke_check"
    Options: ClassVar[type[BaseModel]] = SmokeOptions

    def compose(self, alert, rule):
        return ChoiceQuery(rule.prompt_for(alert), {"yes": ["yes"], "no": ["no"]})

    def interpret(self, answer, rule):
        p = answer.probabilities["yes"]
        verdict = VerdictKind.CONFIRMED if p >= rule.options.threshold else VerdictKind.REJECTED
        return Judgement(verdict, p, f"smoke_check p={p:.2f}")


class SmokePlugin:
    @hookimpl
    def register_rule_kinds(self, register):
        register(SmokeKind())


async def test_a_third_party_rule_kind_reviews_alerts(tmp_path, tiny_model):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "smoke.toml").write_text(
        '[match]\nevent_types = ["smoke"]\n[review]\nkind = "smoke_check"\n'
        'prompt = "Smoke?"\nthreshold = 0.0\n'
    )
    async with run_daemon(settings, extra_plugins=[SmokePlugin()]) as d:
        await d.post_alert(make_alert("smoke-1", event_type="smoke"))
        record = await d.wait_reviewed("smoke-1")
    [verdict] = record["verdicts"]
    assert verdict["rule"] == "smoke" and verdict["verdict"] == "confirmed"
    assert verdict["reason"].startswith("smoke_check p=")


def test_two_plugins_registering_one_name_is_an_error():
    pm = make_plugin_manager()
    pm.register(SmokePlugin(), name="site-a")
    pm.register(SmokePlugin(), name="site-b")
    with pytest.raises(
        PluginError, match="two plugins register the rule kind 'smoke_check': site-b and site-a"
    ):
        Registry.collect(pm)


def test_an_unknown_hook_implementation_fails_at_start():
    class Typo:
        @hookimpl
        def register_rule_kind(self, register):  # missing "s"
            pass

    with pytest.raises(PluginError, match="unknown hook 'register_rule_kind'"):
        make_plugin_manager([Typo()])


class NamelessKind(SmokeKind):
    name = None  # type: ignore[assignment]


class BrokenRegistration:
    def __init__(self, what: str) -> None:
        self.what = what

    @hookimpl
    def register_rule_kinds(self, register):
        if self.what == "raises":
            raise KeyError("zone")
        if self.what == "exits":  # would end the daemon with status 0: no restart
            raise SystemExit(0)
        register(NamelessKind())


@pytest.mark.parametrize(
    ("what", "error"),
    [
        ("raises", r"plugin broken: register_rule_kinds failed: KeyError: 'zone'"),
        ("exits", r"plugin broken: register_rule_kinds failed: SystemExit: 0"),
        ("nameless", r"plugin broken: a rule kind's name must be a text, not None"),
    ],
)
def test_a_plugin_that_fails_to_register_stops_the_start_naming_it(what, error):
    pm = make_plugin_manager()
    pm.register(BrokenRegistration(what), name="broken")
    with pytest.raises(PluginError, match=error):
        Registry.collect(pm)


def test_a_misnamed_hook_in_a_loose_file_is_one_error_line(tmp_path):
    plugin_dir = tmp_path / "plugins.d"
    plugin_dir.mkdir()
    (plugin_dir / "typo.py").write_text(
        "from daemon.hookspecs import hookimpl\n\n"
        "@hookimpl\ndef register_rule_kind(register):\n    pass\n"
    )
    config = tmp_path / "c.toml"
    config.write_text('[plugins]\ndir = "plugins.d"\n')
    result = CliRunner().invoke(main, ["plugins", "--config", str(config)])
    assert result.exit_code == 1
    assert result.output.startswith("error: unknown hook 'register_rule_kind' in plugin")
    assert "Traceback" not in result.output


class VerdictSink:
    """A side-effect plugin with an async `verdict_ready`."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None, str]] = []

    @hookimpl
    async def verdict_ready(self, alert, rule, verdict):
        self.seen.append((alert.alert_id, rule.name if rule else None, verdict.verdict.value))


async def test_verdict_ready_hooks_are_awaited_with_alert_rule_and_verdict(tmp_path, tiny_model):
    sink = VerdictSink()
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    async with run_daemon(settings, extra_plugins=[sink]) as d:
        await d.post_alert(make_alert("sink-1", event_type="unknown"))
        await d.wait_reviewed("sink-1")
    assert sink.seen == [("sink-1", None, "unreviewed")]


class StuckSink:
    """A `verdict_ready` that changes the alert it is given and never returns."""

    def __init__(self) -> None:
        self.started: list[str] = []

    @hookimpl
    async def verdict_ready(self, alert, verdict):
        alert.extra["zone"] = "changed by a sink"
        self.started.append(verdict.alert_id)
        await asyncio.Event().wait()


class ZoneWatcher:
    """Notes the zone of each verdict's alert, then changes it."""

    def __init__(self) -> None:
        self.zones: list[str] = []

    @hookimpl
    def verdict_ready(self, alert):
        self.zones.append(alert.extra["zone"])
        alert.extra["zone"] = "changed by a watcher"


async def test_a_verdict_ready_hook_that_never_returns_holds_up_no_review(tmp_path, tiny_model):
    settings = make_settings(
        tmp_path, broker=None, model=tiny_model, pipeline={"workers": 1, "stop_grace_s": 0.5}
    )
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    (settings.rules.dir / "fire_too.toml").write_text(FIRE_RULE)
    stuck, watcher = StuckSink(), ZoneWatcher()
    async with run_daemon(settings, extra_plugins=[watcher, stuck]) as d:
        for i in range(3):
            assert (await d.post_alert(make_alert(f"s-{i}", extra={"zone": "dock"})))[0] == 202
        for i in range(3):  # one review worker: each review ended without its hooks
            await d.wait_reviewed(f"s-{i}")
        async with asyncio.timeout(5):
            while len(stuck.started) < 6:
                await asyncio.sleep(0.02)
    assert sorted(stuck.started) == ["s-0", "s-0", "s-1", "s-1", "s-2", "s-2"]
    # each call is given its own copy of the alert: two rules' verdicts, the zone as sent
    assert watcher.zones == ["dock"] * 6


class HostileKind:
    """A rule kind whose behaviour each alert's `extra.act` picks: the ways a plugin fails."""

    name: ClassVar[str] = "hostile"
    Options: ClassVar[type[BaseModel]] = SmokeOptions

    def compose(self, alert, rule):
        act = alert.extra.get("act")
        alert.extra["zone"] = "changed by a plugin"  # must not reach the other rules
        if act == "exit":
            raise SystemExit(7)
        if act == "interrupt":
            raise KeyboardInterrupt
        if act == "cancel":
            raise asyncio.CancelledError
        if act == "no-choices":
            return ChoiceQuery("Fire?", {"yes": [], "no": ["no"]})
        if act == "bad-limit":  # would fail every request of its batch in the runner
            return GenerateQuery(rule.prompt_for(alert), max_new_tokens="24")
        return ChoiceQuery(rule.prompt_for(alert), {"yes": ["yes"], "no": ["no"]})

    def interpret(self, answer, rule):
        return Judgement(VerdictKind.CONFIRMED, 2.0, "sure")  # no probability


class HostilePlugin:
    @hookimpl
    def register_rule_kinds(self, register):
        register(HostileKind())

    @hookimpl
    def verdict_ready(self, alert, rule, verdict):
        raise RuntimeError("a sink that is down")


class CountingSink:
    def __init__(self) -> None:
        self.seen: list[str] = []

    @hookimpl
    def verdict_ready(self, verdict):  # a subset of the arguments, as pluggy allows
        self.seen.append(verdict.alert_id)


async def test_a_failing_plugin_fails_its_own_rule_only_and_the_daemon_runs_on(
    tmp_path, tiny_model
):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "hostile.toml").write_text(
        '[match]\nevent_types = ["fire"]\n[review]\nkind = "hostile"\nprompt = "Fire?"\n'
    )
    (settings.rules.dir / "fire.toml").write_text(
        FIRE_RULE + '[publish]\ntopic = "alarms/{extra.zone}/{verdict}"\n'
    )
    sink = CountingSink()
    acts = ["exit", "interrupt", "cancel", "no-choices", "bad-limit", "garbage"]
    async with run_daemon(settings, extra_plugins=[HostilePlugin(), sink]) as d:
        for act in acts:
            alert = make_alert(f"h-{act}", extra={"act": act, "zone": "dock"})
            assert (await d.post_alert(alert))[0] == 202
        records = [await d.wait_reviewed(f"h-{act}") for act in acts]
        assert (await d.daemon.health())["status"] == "ok"
        topics = await d.daemon.journal.read("SELECT topic FROM verdicts WHERE rule = 'fire'")
    reasons = {}
    for act, record in zip(acts, records, strict=True):
        by_rule = {v["rule"]: v for v in record["verdicts"]}
        # the other rule judged as if nothing happened, with the alert as sent
        assert by_rule["fire"]["verdict"] != "unreviewed", act
        assert by_rule["hostile"]["verdict"] == "unreviewed", act
        reasons[act] = by_rule["hostile"]["reason"]
    assert reasons["exit"] == "review failed: 7"
    assert reasons["interrupt"] == "review failed: KeyboardInterrupt"
    assert reasons["cancel"] == "review failed: CancelledError"
    assert "composed choices without answers" in reasons["no-choices"]
    assert "asked for max_new_tokens='24'" in reasons["bad-limit"]
    assert "returned the confidence 2.0 for confirmed" in reasons["garbage"]
    assert len(topics) == len(acts)
    assert all(row["topic"].startswith("alarms/dock/") for row in topics)
    # one sink failing keeps the next from nothing: each verdict reached it
    assert len(sink.seen) == 2 * len(acts)


# third-party packages, loose files, the plugins command, the hooks documentation ---------

EXAMPLE = ROOT / "tests" / "example_plugin"


@pytest.fixture
def example_installed(tmp_path, monkeypatch):
    """The example package made importable with its entry point, as pip would install it."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    dist_info = tmp_path / f"secondlook_example-{project['version']}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    points = project["entry-points"]["secondlook"]
    (dist_info / "entry_points.txt").write_text(
        "[secondlook]\n" + "".join(f"{name} = {target}\n" for name, target in points.items())
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    yield
    sys.modules.pop("secondlook_example", None)


async def test_an_installed_plugin_package_is_loaded_through_its_entry_point(
    tmp_path, tiny_model, example_installed
):
    pm = make_plugin_manager()
    assert "example" in {name for name, _ in pm.list_name_plugin()}
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    (settings.rules.dir / "binary.toml").write_text(
        '[match]\nevent_types = ["fire"]\n[review]\nkind = "binary"\n'
        'prompt = "Real fire or fake?"\nthreshold = 0.0\n'
    )
    async with run_daemon(settings) as d:
        await d.post_alert(make_alert("pkg-1"))
        [verdict] = (await d.wait_reviewed("pkg-1"))["verdicts"]
    import secondlook_example

    assert verdict["rule"] == "binary" and verdict["verdict"] == "confirmed"
    assert verdict["reason"].startswith("binary: P(real)=")
    assert ("pkg-1", "binary", "confirmed") in secondlook_example.VERDICTS


def test_two_packages_declaring_one_plugin_name_stop_the_start(tmp_path, monkeypatch):
    # a package that calls its plugin "cooldown", as the built-in is called
    dist_info = tmp_path / "site_cooldown-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: site-cooldown\nVersion: 1.0\n"
    )
    (dist_info / "entry_points.txt").write_text("[secondlook]\ncooldown = site_cooldown.hooks\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="two packages declare the plugin 'cooldown'"):
        make_plugin_manager()


LOOSE_PLUGIN = """
from __future__ import annotations

from dataclasses import dataclass

from daemon.contract import VerdictKind
from daemon.hookspecs import hookimpl
from daemon.plugin_api import Judgement


@dataclass
class Pattern:  # needs its module in sys.modules (string annotations)
    key: str = "test_pattern"


@hookimpl
def suppress_alert(alert, rule, recent):
    if alert.extra.get(Pattern().key):
        return Judgement(VerdictKind.REJECTED, 0.0, "camera test pattern")
    return None
"""


async def test_loose_plugin_files_are_loaded_and_listed(tmp_path, tiny_model):
    plugin_dir = tmp_path / "plugins.d"
    plugin_dir.mkdir()
    (plugin_dir / "test_pattern.py").write_text(LOOSE_PLUGIN)
    config = tmp_path / "c.toml"
    config.write_text('[plugins]\ndir = "plugins.d"\n')
    listing = CliRunner().invoke(main, ["plugins", "--config", str(config)])
    assert listing.exit_code == 0, listing.output
    assert f"file:test_pattern.py  [{plugin_dir / 'test_pattern.py'}]" in listing.output
    assert "hooks: suppress_alert" in listing.output
    assert "rule kinds:    classify, extract, verdict" in listing.output

    settings = make_settings(
        tmp_path, broker=None, model=tiny_model, plugins={"dir": str(plugin_dir)}
    )
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE + "[cooldown]\nwindow_s = 30\n")
    async with run_daemon(settings) as d:
        await d.post_alert(make_alert("pattern-1", extra={"test_pattern": True}))
        [verdict] = (await d.wait_reviewed("pattern-1"))["verdicts"]
    assert verdict["verdict"] == "rejected" and verdict["reason"] == "camera test pattern"


@pytest.mark.parametrize(
    ("text", "error"),
    [("import not_a_module_anywhere\n", "ModuleNotFoundError"), ("raise SystemExit(3)\n", "3")],
)
def test_a_broken_plugin_file_stops_the_start_naming_the_file(tmp_path, text, error):
    (tmp_path / "broken.py").write_text(text)
    with pytest.raises(PluginError, match=rf"broken\.py: .*{error}"):
        make_plugin_manager(plugins_dir=tmp_path)
    assert "secondlook_plugin_broken" not in sys.modules


def test_a_plugin_directory_that_does_not_exist_stops_the_start(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[plugins]\ndir = "plugins.dd"\n')  # a typo
    listing = CliRunner().invoke(main, ["plugins", "--config", str(config)])
    assert listing.exit_code != 0
    assert f"[plugins] dir {tmp_path / 'plugins.dd'}: no such directory" in listing.output


HOOKS_DOC = ROOT / "docs" / "hooks.md"


def undocumented_hooks(spec_module, doc: str) -> list[str]:
    """Hooks of `spec_module` without a `## name` section showing their signature."""
    missing = []
    for name, function in inspect.getmembers(spec_module, inspect.isfunction):
        if not hasattr(function, "secondlook_spec"):
            continue
        section = re.search(rf"^## {name}\n(.*?)(?=^## |\Z)", doc, re.S | re.M)
        params = ", ".join(inspect.signature(function).parameters)
        if section is None or f"def {name}({params})" not in section.group(1):
            missing.append(name)
    return missing


def test_every_hook_is_documented_with_its_signature():
    assert undocumented_hooks(hookspecs, HOOKS_DOC.read_text()) == []


def test_an_undocumented_hook_fails_the_documentation_check():
    extra = types.ModuleType("more_specs")
    exec(
        "from daemon.hookspecs import hookspec\n"
        "@hookspec\ndef alert_expired(alert):\n    '''A new hook nobody documented.'''\n",
        extra.__dict__,
    )
    assert undocumented_hooks(extra, HOOKS_DOC.read_text()) == ["alert_expired"]


class StringFormat:
    """An alert format that returns the wrong type."""

    name: ClassVar[str] = "wrong_type"

    def parse(self, payload, *, topic):
        return "an alert, honestly"


class UndecodedFormat:
    """An alert format that forgets to decode its snapshot: text where bytes belong."""

    name: ClassVar[str] = "undecoded"

    def parse(self, payload, *, topic):
        data = json.loads(payload)
        alert = Alert.model_validate({k: v for k, v in data.items() if k != "image"})
        return IncomingAlert(alert, [RawImage("image", data["image"])])


class WrongTypePlugin:
    @hookimpl
    def register_alert_formats(self, register):
        register(StringFormat())
        register(UndecodedFormat())


@pytest.mark.parametrize("fmt", ["wrong_type", "undecoded"])
async def test_a_format_returning_the_wrong_type_is_a_refusal_naming_it(
    tmp_path, broker, tiny_model, fmt
):
    settings = make_settings(
        tmp_path,
        broker=broker,
        model=tiny_model,
        mqtt={"subscriptions": [{"topic": "vendor/#", "format": fmt}]},
    )
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    async with (
        collect(broker, "secondlook/verdicts/#") as out,
        run_daemon(settings, extra_plugins=[WrongTypePlugin()]) as d,
    ):
        url = f"{d.base_url}/v1/alerts?format={fmt}"
        async with d.http.post(url, json=make_alert("typed")) as response:
            assert response.status == 400
            body = await response.json()
        assert body["field"] == "payload" and f"the {fmt} format could not read it" in body["error"]
        # over MQTT: refused and acknowledged, so the next message goes on
        await publish(broker, "vendor/box-1", json.dumps(make_alert("typed-too")))
        await publish(broker, "secondlook/alerts/box-1", json.dumps(make_alert("after")))
        [(_, verdict)] = await out.wait_for(1)
        rows = await d.daemon.journal.read("SELECT source, field FROM rejects ORDER BY id")
    assert verdict["alert_id"] == "after"
    assert [tuple(row) for row in rows] == [("http", "payload"), ("mqtt", "payload")]


class FragileOptions(BaseModel):
    level: int = 0

    @field_validator("level")
    @classmethod
    def _fragile(cls, value: int) -> int:
        raise TypeError("a validator that breaks")  # pydantic lets TypeError through


class FragileKind(SmokeKind):
    name: ClassVar[str] = "fragile"
    Options: ClassVar[type[BaseModel]] = FragileOptions


def test_a_rule_kind_that_breaks_while_a_rule_loads_refuses_that_file_only(tmp_path):
    path = tmp_path / "fragile.toml"
    text = '[match]\nevent_types = ["fire"]\n[review]\nkind = "fragile"\nprompt = "x"\nlevel = 1\n'
    with pytest.raises(RuleError, match="kind 'fragile' failed: TypeError"):
        parse_rule(path, text, {"fragile": FragileKind()})
