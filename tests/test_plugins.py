"""Plugins: built-ins come in through the entry point group, like any third-party plugin."""

from __future__ import annotations

from typing import ClassVar

import pytest
from pydantic import BaseModel, ConfigDict

from daemon.contract import VerdictKind
from daemon.hookspecs import hookimpl
from daemon.plugin_api import ChoiceQuery, Judgement
from daemon.plugins import ENTRY_POINT_GROUP, PluginError, Registry, make_plugin_manager
from tests.conftest import make_alert, make_settings, run_daemon


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
    with pytest.raises(PluginError, match="two plugins register the rule kind 'smoke_check'"):
        Registry.collect(make_plugin_manager([SmokePlugin(), SmokePlugin()]))


def test_an_unknown_hook_implementation_fails_at_start():
    class Typo:
        @hookimpl
        def register_rule_kind(self, register):  # missing "s"
            pass

    from pluggy import PluginValidationError

    with pytest.raises(PluginValidationError, match="unknown hook 'register_rule_kind'"):
        make_plugin_manager([Typo()])


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
