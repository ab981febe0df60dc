"""The `secondlook` command as users run it: a subprocess with signals and sd_notify."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

from click.testing import CliRunner

from daemon.app import JOURNAL_FILE
from daemon.cli import main
from tests.conftest import FIRE_RULE, ROOT, collect, free_port, jpeg_bytes, make_alert, publish
from tests.daemon_proc import (
    Notifications,
    log_path,
    run_to_exit,
    start,
    wait_http_ok,
    write_config,
)


async def test_run_signals_readiness_reloads_on_hup_and_stops_cleanly_on_term(
    tmp_path, broker, tiny_model
):
    config, http = write_config(tmp_path, broker.port, tiny_model)
    notify = Notifications(tmp_path / "notify.sock")
    status_topic = f"cli/{tmp_path.name}/status"
    async with collect(broker, status_topic, "secondlook/verdicts/#") as out:
        proc = start(config, notify)
        try:
            await wait_http_ok(f"http://{http}", proc)
            assert "READY=1" in "\n".join(notify.read())
            await out.wait_until(status_topic, b"online")
            # no rules yet: forwarded unreviewed; then a rule appears and SIGHUP loads it
            await publish(broker, "secondlook/alerts/b", json.dumps(make_alert("cli-1")))
            [(_, first)] = await out.wait_for(1)
            assert first["reason"] == "no rule"
            (config.parent / "rules" / "fire.toml").write_text(FIRE_RULE)
            proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.5)
            await publish(broker, "secondlook/alerts/b", json.dumps(make_alert("cli-2")))
            verdicts = await out.wait_for(2)
            assert verdicts[1][1]["rule"] == "fire"
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        output = log_path(config).read_text()
        lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
        events = [line["event"] for line in lines]
        assert "rules reloaded" in events and "stopped" in events
        # per-alert log lines carry the alert id and the rule
        assert any(line.get("alert_id") == "cli-2" and line.get("rule") == "fire" for line in lines)
        assert "STOPPING=1" in notify.read()
        await out.wait_until(status_topic, b"offline")


async def test_a_killed_daemon_is_announced_offline_by_its_last_will(tmp_path, broker, tiny_model):
    config, http = write_config(tmp_path, broker.port, tiny_model)
    status_topic = f"cli/{tmp_path.name}/status"
    proc = start(config)
    try:
        await wait_http_ok(f"http://{http}", proc)
    finally:
        proc.kill()
        proc.wait(10)
    async with collect(broker, status_topic) as out:
        await out.wait_until(status_topic, b"offline")
        assert out.messages[-1][1:] == (b"offline", True)


def test_run_refuses_a_bad_config_with_the_key(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[mqtt]\nport = 'one'\n")
    result = run_to_exit(config)
    assert result.returncode != 0
    assert "mqtt.port: Input should be a valid integer" in result.stderr


def test_run_exits_non_zero_when_the_model_cannot_be_loaded(tmp_path):
    config, _ = write_config(tmp_path, free_port(), tmp_path / "missing-model")
    config.write_text(config.read_text().replace("[mqtt]", "[mqtt]\nenabled = false"))
    result = run_to_exit(config, timeout=120)
    assert result.returncode == 1
    assert "cannot load model" in result.stderr


def test_run_with_a_damaged_journal_exits_1_with_one_error_line_and_leaves_it_as_it_was(
    tmp_path,
):
    config, _ = write_config(tmp_path, free_port(), tmp_path / "missing-model")
    journal = tmp_path / "var" / JOURNAL_FILE
    journal.parent.mkdir()
    journal.write_bytes(b"\x00\xff" * 3000)
    result = run_to_exit(config)
    assert result.returncode == 1
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.stderr
    assert line.startswith(f"error: the journal {journal} cannot be opened: ")
    assert "the file is damaged: move it aside" in line
    assert journal.read_bytes() == b"\x00\xff" * 3000


def test_every_command_names_a_model_that_cannot_load_without_a_traceback(tmp_path):
    missing = str(tmp_path / "no-model")
    image = tmp_path / "snap.jpg"
    image.write_bytes(jpeg_bytes())
    for args in (
        ["replay", str(ROOT / "sample_alerts"), "--rules", str(ROOT / "rules")],
        ["try", str(image), "--prompt", "Fire?"],
    ):
        result = CliRunner().invoke(main, [*args, "--model", missing])
        assert result.exit_code == 1, (args, result.output)
        assert f"error: cannot load model '{missing}': no such directory" in result.output
        assert "Traceback" not in result.output


def test_replay_prints_a_table_of_verdicts_for_the_samples(tiny_model):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon",
            "replay",
            str(ROOT / "sample_alerts"),
            "--rules",
            str(ROOT / "rules"),
            "--model",
            str(tiny_model),
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    live = [row for row in rows if not row["topic"].startswith("secondlook/shadow/")]
    samples = sorted((ROOT / "sample_alerts").glob("*.json"))
    assert [row["verdict"]["alert_id"] for row in live] == [
        json.loads(path.read_text())["alert_id"] for path in samples
    ]
    assert all(row["verdict"]["rule"] is not None for row in live)
    shadow = [row["verdict"] for row in rows if row not in live]
    assert {v["rule"] for v in shadow} == {"fire_source"} and len(shadow) == 2


def test_replay_and_eval_refuse_missing_rules_or_no_alert_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "a-file").write_text("")
    rules = ["--rules", str(ROOT / "rules")]
    for args, message in (
        (["tiny-model", str(tmp_path / "a-file" / "m")], "a-file is no writable folder"),
        (["replay", str(empty), *rules], f"no alert files (*.json) in {empty}"),
        (["eval", str(empty), *rules, "--out", str(tmp_path / "e")], "no alert files"),
        (
            ["replay", str(ROOT / "sample_alerts"), "--rules", str(tmp_path / "typo")],
            f"no rules directory at {tmp_path / 'typo'}",
        ),
    ):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and message in result.output, (args, result.output)
    assert not (tmp_path / "e").exists()


def test_replay_shows_names_and_ids_as_they_are(tmp_path, tiny_model):
    alerts = tmp_path / "alerts"
    alerts.mkdir()
    (alerts / "odd.json").write_text(json.dumps(make_alert("cam[/x]-1")))
    (alerts / "red.json").write_text(json.dumps(make_alert("cam[red]-2")))
    # a file name that is no UTF-8 (seen as surrogates): stored and shown with a stand-in
    (alerts / os.fsdecode(b"caf\xe9.json")).write_text(json.dumps(make_alert("latin-1")))
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "fire.toml").write_text(FIRE_RULE)
    replay = ["replay", str(alerts), "--rules", str(rules), "--model", str(tiny_model)]
    result = subprocess.run(
        [sys.executable, "-m", "daemon", *replay],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    assert "cam[/x]-1" in result.stdout and "cam[red]-2" in result.stdout
    assert "caf\ufffd" in result.stdout and "latin-1" in result.stdout
