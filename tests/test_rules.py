"""Rule files: validation errors name the file and the line or key; bad files are skipped."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from structlog.testing import capture_logs

from daemon.app import Daemon
from daemon.cli import main
from daemon.contract import Alert
from daemon.plugins import Registry, make_plugin_manager
from daemon.rules import RULE_FILE_MAX_BYTES, RuleBook
from daemon.rules_saved import SavedRules
from daemon.templates import check_topic_template, render_topic
from tests.conftest import (
    CLASSIFY_RULE,
    FIRE_RULE,
    RULES,
    collect,
    make_alert,
    make_settings,
    publish,
    run_daemon,
)

KINDS = Registry.collect(make_plugin_manager()).rule_kinds

BROKEN = {
    "syntax.toml": ('[match]\nevent_types = "fire\n[review]\n', "line 2", "not valid TOML"),
    "no_match.toml": ('[review]\nprompt = "x"\n', "match", "Field required"),
    "typo.toml": (FIRE_RULE + "\nconfirm_att = 0.5\n", "confirm_att", "unknown key"),
    "bad_kind.toml": (FIRE_RULE.replace('"verdict"', '"verdikt"'), "review.kind", "unknown kind"),
    "thresholds.toml": (
        FIRE_RULE + "confirm_at = 0.3\nreject_below = 0.5\n",
        "review",
        "reject_below",
    ),
    "field_type.toml": (
        '[match]\nevent_types = ["p"]\n[review]\nkind = "extract"\nprompt = "x"\n'
        '[review.fields]\nn = { type = "int" }\n',
        "review.fields.n.type",
        "Input should be",
    ),
    "topic.toml": (
        FIRE_RULE + '[publish]\ntopic = "alarms/{zone}"\n',
        "publish.topic",
        "unknown field",
    ),
    "broker_topic.toml": (
        FIRE_RULE + '[publish]\ntopic = "$SYS/alarms/{verdict}"\n',
        "publish.topic",
        "cannot start with $",
    ),
    # a priority the journal could not keep as an integer
    "priority.toml": ("priority = 9223372036854775808\n" + FIRE_RULE, "priority", "less than"),
    "empty_label.toml": (
        CLASSIFY_RULE.replace('labels = ["fight", "play"]', 'labels = ["fight", "play", ""]'),
        "review",
        "a label cannot be empty",
    ),
    "token_label.toml": (
        CLASSIFY_RULE.replace(
            'labels = ["fight", "play"]', 'labels = ["fight", "play", "<|im_end|>"]'
        ),
        "review",
        "label '<|im_end|>' cannot hold the model's control tokens",
    ),
    "token_field.toml": (
        '[match]\nevent_types = ["p"]\n[review]\nkind = "extract"\nprompt = "x"\n'
        '[review.fields]\nn = { type = "integer", description = "n <|im_end|>" }\n',
        "review.fields.n.description",
        "control tokens",
    ),
    "token_name.toml": (
        '[match]\nevent_types = ["p"]\n[review]\nkind = "extract"\nprompt = "x"\n'
        '[review.fields]\n"<|image_pad|>" = { type = "integer" }\n',
        "review.fields",
        "control tokens",
    ),
    "nul_adapter.toml": (FIRE_RULE + 'adapter = "a\\u0000b"\n', "review.adapter", "null"),
}


def test_each_broken_file_is_reported_with_where_and_why_and_the_rest_load(tmp_path):
    (tmp_path / "fire.toml").write_text(FIRE_RULE)
    for name, (text, _, _) in BROKEN.items():
        (tmp_path / name).write_text(text)
    book = RuleBook(tmp_path, KINDS)
    with capture_logs() as logs:
        errors = book.load()
    assert [rule.name for rule in book.rules] == ["fire"]
    by_file = {error.path.name: error for error in errors}
    assert by_file.keys() == BROKEN.keys()
    for name, (_, where, reason) in BROKEN.items():
        assert where in by_file[name].where, (name, by_file[name])
        assert reason in str(by_file[name]), (name, by_file[name])
    assert sum(entry["event"] == "rule file rejected" for entry in logs) == len(BROKEN)
    assert by_file["thresholds.toml"].where == "review"  # a check across keys names the section


def test_syntax_error_names_the_line(tmp_path):
    (tmp_path / "bad.toml").write_text('description = "x"\n[match]\nevent_types = ["fire"\n')
    [error] = RuleBook(tmp_path, KINDS).load()
    assert error.where == "line 4 (end of file)"


def test_a_broken_edit_keeps_the_last_good_version(tmp_path):
    path = tmp_path / "fire.toml"
    path.write_text(FIRE_RULE)
    book = RuleBook(tmp_path, KINDS)
    assert book.load() == []
    good = book.rules[0]
    path.write_text(FIRE_RULE.replace("[review]", "[review\n"))
    [error] = book.load()
    assert error.path == path
    assert book.rules == [good]
    path.unlink()
    assert book.load() == [] and book.rules == []


def saving(rules: Path, saved: Path, **options) -> RuleBook:
    """A rule book that saves its rules (as the daemon's, once the model is loaded)."""
    book = RuleBook(rules, KINDS, saved=SavedRules(saved), **options)
    book.final = True
    return book


def test_a_file_broken_across_a_restart_keeps_its_saved_version(tmp_path):
    rules, saved = tmp_path / "rules", tmp_path / "var" / "rules-last-good.json"
    rules.mkdir()
    saved.parent.mkdir()
    path = rules / "fire.toml"
    path.write_text(FIRE_RULE)
    first = saving(rules, saved)
    assert first.load() == []
    good = first.rules[0]
    # broken while the daemon is down: the next start uses the version saved
    path.write_text(FIRE_RULE.replace("[review]", "[review\n"))
    restarted = saving(rules, saved)
    with capture_logs() as logs:
        [error] = restarted.load()
    assert error.path == path and "not valid TOML" in error.reason
    assert [(r.name, r.digest) for r in restarted.rules] == [("fire", good.digest)]
    rejected = next(entry for entry in logs if entry["event"] == "rule file rejected")
    assert rejected["action"] == "keeping last good version"
    # ... and keeps it saved for the start after that
    third = saving(rules, saved)
    third.load()
    assert [r.digest for r in third.rules] == [good.digest]
    # a deleted file is forgotten, here and after a restart
    path.unlink()
    third.load()
    path.write_text("not toml [")
    fourth = saving(rules, saved)
    assert len(fourth.load()) == 1 and fourth.rules == []


def test_a_saved_version_is_judged_by_todays_checks(tmp_path):
    saved = SavedRules(tmp_path / "saved.json")
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "fire.toml").write_text(FIRE_RULE)
    saving(rules, saved.path).load()
    (rules / "fire.toml").write_text("broken [")

    def refuse(choices):
        raise ValueError("yes and no share a first token")

    book = saving(rules, saved.path, check_choices=refuse)
    assert len(book.load()) == 1 and book.rules == []


def test_a_file_edited_while_down_that_fails_the_models_checks_keeps_the_saved_version(
    tmp_path,
):
    rules, saved = tmp_path / "rules", tmp_path / "saved.json"
    rules.mkdir()
    path = rules / "fight.toml"
    path.write_text(CLASSIFY_RULE)

    def tokenizer_check(choices):  # as the model's: the edited answers share a first token
        if "fighting" in choices:
            raise ValueError("'fight' and 'fighting' share their first tokens")

    def start() -> RuleBook:
        """The daemon's order: the rules before the model loads, then with its checks."""
        book = RuleBook(rules, KINDS, saved=SavedRules(saved))
        book.load()
        book.check_choices, book.final = tokenizer_check, True
        book.load(recheck=True)
        return book

    good = start().rules[0]
    # edited while the daemon is down: passes every check but the model's
    path.write_text(CLASSIFY_RULE.replace('"play"]', '"play", "fighting"]'))
    book = start()
    assert [(r.name, r.digest) for r in book.rules] == [("fight", good.digest)]
    assert "answers cannot be told apart" in book.errors[0].reason
    assert SavedRules(saved).get(path) == CLASSIFY_RULE  # and still saved for the next start
    assert [r.digest for r in start().rules] == [good.digest]


def test_an_unreadable_saved_rules_file_is_ignored_and_written_afresh(tmp_path):
    saved = tmp_path / "saved.json"
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "fire.toml").write_text(FIRE_RULE)
    for junk in (b"\xff{", b"[]", b'{"version": 9, "files": {}}', b"[" * 100_000):
        saved.write_bytes(junk)
        with capture_logs() as logs:
            book = saving(rules, saved)
        assert any("saved rules" in entry["event"] for entry in logs), junk[:20]
        assert book.load() == [] and [r.name for r in book.rules] == ["fire"]
        assert SavedRules(saved).get(rules / "fire.toml") == FIRE_RULE


def test_matching_by_event_type_and_camera_and_box_globs(tmp_path):
    (tmp_path / "north.toml").write_text(
        FIRE_RULE.replace(
            'event_types = ["fire"]',
            'event_types = ["fire"]\ncameras = ["cam-n*"]\nboxes = ["box-1", "box-2"]',
        )
    )
    book = RuleBook(tmp_path, KINDS)
    book.load()

    def alert(**fields):
        return Alert.model_validate({**make_alert(), **fields})

    assert [r.name for r in book.match(alert(camera_id="cam-n7", box_id="box-2"))] == ["north"]
    assert book.match(alert(camera_id="cam-s1", box_id="box-2")) == []
    assert book.match(alert(camera_id="cam-n7", box_id="box-9")) == []
    assert book.match(alert(camera_id="cam-n7", box_id="box-1", event_type="smoke")) == []


def test_a_rule_topic_the_daemons_own_subscriptions_cover_is_refused(tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    topics = {
        "echo": ("secondlook/alerts/{verdict}/{camera_id}", "alert topic 'secondlook/alerts/#'"),
        "feedback": ("secondlook/feedback/{rule}", "feedback topic 'secondlook/feedback/#'"),
        "shadowed": ("{verdict}/x", "alert topic 'secondlook/shadow/confirmed/#'"),
        "fine": ("alarms/{site}/{verdict}", None),
        "fine_shadow": ("{verdict}/y", None),
    }
    for name, (topic, _) in topics.items():
        shadow = "shadow = true\n" if name.endswith("shadowed") else ""
        (rules / f"{name}.toml").write_text(f"{shadow}{FIRE_RULE}[publish]\ntopic = {topic!r}\n")
    config = tmp_path / "secondlook.toml"
    config.write_text(
        '[mqtt]\nsubscribe = ["secondlook/alerts/#", "secondlook/shadow/confirmed/#"]\n'
    )
    result = CliRunner().invoke(main, ["rules", "check", str(rules), "--config", str(config)])
    assert result.exit_code == 1, result.output
    for name, (_, echo) in topics.items():
        if echo is None:
            assert f"ok    {rules / name}.toml" in result.output
        else:
            assert f"{name}.toml: publish.topic: the {echo}" in result.output, result.output
    # judged alike where MQTT is off (replay, eval and an HTTP-only daemon)
    offline = make_settings(
        tmp_path,
        broker=None,
        model=tmp_path,
        rules_dir=rules,
        mqtt={"subscribe": ["secondlook/alerts/#", "secondlook/shadow/confirmed/#"]},
    )
    errors = Daemon(offline).rules.load()
    assert sorted(e.path.stem for e in errors) == ["echo", "feedback", "shadowed"]
    # the daemon's verdict topic is rendered with a box's values: none starts it with $
    rendered = render_topic(
        check_topic_template("{site}/alarms/{verdict}"),
        Alert.model_validate({**make_alert(), "site": "$SYS"}),
        rule="r",
        verdict="confirmed",
    )
    assert rendered == "_SYS/alarms/confirmed"


def test_rules_check_command_exits_non_zero_naming_each_bad_file(tmp_path):
    (tmp_path / "fire.toml").write_text(FIRE_RULE)
    (tmp_path / "typo.toml").write_text(BROKEN["typo.toml"][0])
    (tmp_path / "syntax.toml").write_text(BROKEN["syntax.toml"][0])
    result = CliRunner().invoke(main, ["rules", "check", str(tmp_path)])
    assert result.exit_code == 1
    assert "ok    " in result.output and "fire.toml" in result.output
    assert "typo.toml: review.confirm_att" in result.output
    assert "syntax.toml: line 2, column" in result.output
    (tmp_path / "typo.toml").unlink()
    (tmp_path / "syntax.toml").unlink()
    assert CliRunner().invoke(main, ["rules", "check", str(tmp_path)]).exit_code == 0


def test_shipped_example_rules_are_valid():
    result = CliRunner().invoke(main, ["rules", "check", str(RULES)])
    assert result.exit_code == 0, result.output


async def test_daemon_skips_a_broken_rule_file_and_reviews_with_the_rest(
    tmp_path, broker, tiny_model
):
    settings = make_settings(tmp_path, broker=broker, model=tiny_model)
    (settings.rules.dir / "fire.toml").write_text(FIRE_RULE)
    (settings.rules.dir / "broken.toml").write_text(BROKEN["typo.toml"][0].replace("fire", "smoke"))
    async with collect(broker, "secondlook/verdicts/#") as out, run_daemon(settings) as d:
        health = await d.daemon.health()
        assert health["rules"] == ["fire"]
        assert "broken.toml: review.confirm_att" in health["rule_errors"][0]
        await publish(broker, "secondlook/alerts/b", json.dumps(make_alert("r-1")))
        await publish(
            broker, "secondlook/alerts/b", json.dumps(make_alert("r-2", event_type="smoke"))
        )
        verdicts = {v["alert_id"]: v for _, v in await out.wait_for(2)}
    assert verdicts["r-1"]["rule"] == "fire"
    assert verdicts["r-2"]["verdict"] == "unreviewed" and verdicts["r-2"]["reason"] == "no rule"


async def test_a_rule_file_broken_while_the_daemon_was_down_keeps_its_last_good_version(
    tmp_path, tiny_model
):
    settings = make_settings(tmp_path, broker=None, model=tiny_model)
    path = settings.rules.dir / "fire.toml"
    path.write_text(FIRE_RULE)
    async with run_daemon(settings) as d:
        assert (await d.daemon.health())["rules"] == ["fire"]
    path.write_text(FIRE_RULE.replace("[review]", "[review\n"))
    async with run_daemon(settings) as d:
        health = await d.daemon.health()
        assert health["rules"] == ["fire"] and "fire.toml: line" in health["rule_errors"][0]
        await d.post_alert(make_alert("kept-1"))
        [verdict] = (await d.wait_reviewed("kept-1"))["verdicts"]
    assert verdict["rule"] == "fire" and verdict["verdict"] != "unreviewed"


def test_a_newcomer_cannot_take_an_established_rules_name(tmp_path):
    (tmp_path / "fire.toml").write_text(FIRE_RULE)
    book = RuleBook(tmp_path, KINDS)
    assert book.load() == []
    # a copy that keeps the name sorts first, yet the file that held the name keeps it
    (tmp_path / "a-copy.toml").write_text('name = "fire"\n' + FIRE_RULE)
    [error] = book.load()
    assert error.path.name == "a-copy.toml" and "already in" in error.reason
    assert [(rule.name, rule.path.name) for rule in book.rules] == [("fire", "fire.toml")]
    # and a broken edit of the established file keeps its last good version
    (tmp_path / "fire.toml").write_text("[match\n")
    errors = book.load()
    assert sorted(e.path.name for e in errors) == ["a-copy.toml", "fire.toml"]
    assert [(rule.name, rule.path.name) for rule in book.rules] == [("fire", "fire.toml")]


def test_a_rule_file_with_a_byte_order_mark_loads(tmp_path):
    (tmp_path / "fire.toml").write_bytes(b"\xef\xbb\xbf" + FIRE_RULE.encode())  # Notepad's
    book = RuleBook(tmp_path, KINDS)
    assert book.load() == [] and book.get("fire") is not None


def test_a_loaded_file_renamed_to_another_files_rule_cannot_take_its_name(tmp_path):
    for holder in (FIRE_RULE, "[match\n"):  # in force, or broken on its last good version
        (tmp_path / "fire.toml").write_text(FIRE_RULE)
        (tmp_path / "a.toml").write_text(FIRE_RULE)  # rule "a", sorting first
        book = RuleBook(tmp_path, KINDS)
        assert book.load() == []
        (tmp_path / "fire.toml").write_text(holder)
        (tmp_path / "a.toml").write_text('name = "fire"\n' + FIRE_RULE)
        errors = {error.path.name: error.reason for error in book.load()}
        assert errors["a.toml"].endswith("already in " + str(tmp_path / "fire.toml"))
        held = {rule.name: rule.path.name for rule in book.rules}
        assert held["fire"] == "fire.toml" and held["a"] == "a.toml"  # a's last good stays


def test_files_that_cannot_be_parsed_at_all_are_refused_alone(tmp_path):
    (tmp_path / "fire.toml").write_text(FIRE_RULE)
    (tmp_path / "deep.toml").write_text("x = " + "[" * 2000 + "]" * 2000 + "\n")
    (tmp_path / "huge.toml").write_text(FIRE_RULE + "#" * (RULE_FILE_MAX_BYTES + 1))
    (tmp_path / "latin.toml").write_bytes(FIRE_RULE.replace("Is", "Ist es Glüh").encode("latin-1"))
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "looped.toml").write_text(FIRE_RULE + 'adapter = "loop/x"\n')
    # an editor's lock file (a dangling symlink) and swap files are not rule files
    (tmp_path / ".#fire.toml").symlink_to(tmp_path / "nowhere")
    (tmp_path / ".fire.toml.swp.toml").write_text("not a rule")
    book = RuleBook(tmp_path, KINDS)
    errors = {error.path.name: str(error) for error in book.load()}
    assert [rule.name for rule in book.rules] == ["fire"]
    assert errors.keys() == {"deep.toml", "huge.toml", "latin.toml", "looped.toml"}
    assert "nested too deeply" in errors["deep.toml"]
    assert f"over {RULE_FILE_MAX_BYTES} bytes" in errors["huge.toml"]
    assert "not UTF-8 text" in errors["latin.toml"]
    assert "review.adapter: loop/x: cannot be followed" in errors["looped.toml"]


def test_a_directory_that_cannot_be_listed_keeps_the_rules_in_force(tmp_path, monkeypatch):
    (tmp_path / "fire.toml").write_text(FIRE_RULE)
    book = RuleBook(tmp_path, KINDS)
    book.load()

    def refused(path):
        raise PermissionError(13, "Permission denied", str(path))

    # (the tests run as root, whom no permission stops: listing fails as it does for others)
    monkeypatch.setattr("daemon.rules.os.scandir", refused)
    [error] = book.load()
    assert [rule.name for rule in book.rules] == ["fire"]
    assert str(error) == f"{tmp_path}: Permission denied"
    monkeypatch.undo()
    (tmp_path / "fire.toml").rename(tmp_path.parent / f"{tmp_path.name}-fire.toml")
    tmp_path.rmdir()
    [error] = book.load()
    assert [rule.name for rule in book.rules] == ["fire"]
    assert "rules directory does not exist" in str(error)


def test_rules_check_knows_the_rule_kinds_of_the_configs_plugins_dir(tmp_path):
    plugins = tmp_path / "plugins.d"
    plugins.mkdir()
    (plugins / "binary.py").write_text(
        "from daemon.hookspecs import hookimpl\n"
        "from plugins.verdict import YesNoVerdict\n\n\n"
        "class Binary(YesNoVerdict):\n"
        '    name = "binary"\n\n\n'
        "@hookimpl\n"
        "def register_rule_kinds(register):\n"
        "    register(Binary())\n"
    )
    config = tmp_path / "secondlook.toml"
    config.write_text('[plugins]\ndir = "plugins.d"\n')
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "bin.toml").write_text(FIRE_RULE.replace('"verdict"', '"binary"'))
    alone = CliRunner().invoke(main, ["rules", "check", str(rules)])
    assert alone.exit_code == 1 and "unknown kind 'binary'" in alone.output
    result = CliRunner().invoke(main, ["rules", "check", str(rules), "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "rule=bin kind=binary" in result.output
