"""The bench commands: they run, compare, and print the figures they promise."""

from __future__ import annotations

import json

from click.testing import CliRunner

from daemon.bench_load import PUBACK, PUBLISH, packet, take_packets
from daemon.bench_model import ARCHS
from daemon.cli import ARCH_NAMES, main

SIDE_KEYS = {"alerts_per_s", "p50_ms", "p95_ms", "p99_ms", "peak_rss_mb", "visual_tokens"}


def last_json_line(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_model_bench_runs_both_paths_and_reports_the_speedup(tiny_model):
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "--model",
            str(tiny_model),
            "--alerts",
            "3",
            "--baseline-alerts",
            "2",
            "--baseline-new-tokens",
            "5",
            "--max-batch",
            "2",
            "--image-size",
            "1280x720",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    figures = last_json_line(result.output)
    for side, count in (("baseline", 2), ("secondlook", 3)):
        assert figures[side].keys() >= SIDE_KEYS
        assert figures[side]["alerts"] == count
        assert 0 < figures[side]["p50_ms"] <= figures[side]["p95_ms"] <= figures[side]["p99_ms"]
    ours = figures["secondlook"]
    assert ours["max_batch"] == 2
    # 3 alerts in batches of 2 at most; the model busy part of the time
    assert ours["batches"] >= 2 and ours["mean_batch"] == round(3 / ours["batches"], 2)
    assert 0 < ours["model_busy_pct"] <= 100
    # what the baseline generated (a random model seldom stops early), within its cap
    assert 1 <= figures["baseline"]["new_tokens"] <= figures["baseline"]["max_new_tokens"] == 5
    light = figures["light_load"]
    assert light["alerts"] == 3 and 0 < light["p50_ms"] <= light["p99_ms"]
    # the processor's default resolution against the 448x448 budget
    assert figures["baseline"]["visual_tokens"] == 1196
    assert figures["secondlook"]["visual_tokens"] == 252
    ratio = figures["secondlook"]["alerts_per_s"] / figures["baseline"]["alerts_per_s"]
    assert abs(figures["speedup"] - ratio) < 0.01
    assert "speed-up" in result.output  # the table


def test_pipeline_bench_counts_every_stage_and_publishes_each_verdict_once(tmp_path):
    alerts = 400  # enough for reviews, journal commits and publishing to overlap
    args = ["bench", "--backend", "instant", "--alerts", str(alerts), "--image-size", "320x180"]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    figures = last_json_line(result.output)
    assert figures["alerts"] == alerts and figures["alerts_per_s"] > 0
    assert figures["duplicates"] == 0
    stages = figures["stages"]
    for stage in ("parse", "journal_alert", "prepare", "model", "journal_verdict", "publish"):
        assert stages[stage]["count"] == alerts, stage
    cpu = figures["cpu_ms_per_alert"]
    for where in ("event_loop", "image_prep", "journal_writer", "load_generator"):
        assert cpu[where] > 0, where
    assert figures["daemon_cpu_ms_per_alert"] >= cpu["event_loop"] + cpu["image_prep"]
    # the cores cannot be busier than all busy, nor the rate past the CPU-bound one
    assert 0 < figures["cpu_busy_pct"] <= 100 * 1.05
    assert figures["alerts_per_s"] <= figures["cpu_bound_alerts_per_s"] * 1.05
    assert "CPU ms per alert" in result.output


def test_pipeline_bench_with_the_model_in_its_own_process(tiny_model):
    alerts = 20  # CPU is counted from the first alert on, however few
    args = ["bench", "--backend", "pipeline", "--model", str(tiny_model), "--worker", "process"]
    args += ["--alerts", str(alerts), "--image-size", "320x180", "--max-batch", "8", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    figures = last_json_line(result.output)
    assert figures["backend"] == "transformers" and figures["worker"] == "process"
    assert figures["model"] == tiny_model.name
    assert figures["alerts"] == alerts and figures["duplicates"] == 0
    for stage in ("prepare", "model", "journal_verdict", "publish"):
        assert figures["stages"][stage]["count"] == alerts, stage
    cpu = figures["cpu_ms_per_alert"]
    assert cpu["model_process"] > 0 and cpu["event_loop"] > 0  # the child's CPU is counted
    assert "in a process" in result.output


def test_the_command_line_knows_the_same_architectures_as_the_bench():
    assert set(ARCH_NAMES) == set(ARCHS)


def test_the_load_generator_reads_packets_that_arrive_in_pieces():
    big = packet(PUBLISH, 0b0010, b"\x00\x01t", b"\x00\x07", b"x" * 300)  # 2-byte length
    stream = packet(PUBACK, 0, b"\x00\x05") + big + packet(PUBACK, 0, b"\x00\x06")
    inbox, found = bytearray(), []
    for i in range(0, len(stream), 7):
        inbox += stream[i : i + 7]
        found += take_packets(inbox)
    assert [(kind, body[:2]) for kind, _, body in found] == [
        (PUBACK, b"\x00\x05"),
        (PUBLISH, b"\x00\x01"),
        (PUBACK, b"\x00\x06"),
    ]
    assert found[1][1] == 0b0010 and found[1][2].endswith(b"x" * 300)
    assert inbox == bytearray()


def test_a_random_snapshot_of_an_architecture_loads_as_a_model(tmp_path, monkeypatch):
    from daemon.bench_model import write_random_snapshot
    from daemon.config import ModelSettings
    from daemon.inference.runner import ModelRunner
    from daemon.inference.synthetic import TINY

    # the tiny sizes stand in for a full-size table entry (same code, seconds not minutes)
    monkeypatch.setitem(ARCHS, "tiny-qwen2-vl", ("qwen2-vl", *TINY["qwen2-vl"]))
    path = write_random_snapshot("tiny-qwen2-vl", tmp_path / "snapshot", "cpu", "auto")
    runner = ModelRunner.load(ModelSettings(path=str(path), device="cpu"))
    assert runner.model.config.model_type == "qwen2_vl"
    runner.warm_up()  # a pass over an image, through the loaded processor


def test_bench_refuses_options_it_would_ignore_or_could_not_measure():
    for args, message in (
        (["--backend", "instant", "--arch", "qwen2-vl-7b"], "--backend instant runs no model"),
        (["--model", "/m", "--arch", "qwen2-vl-7b"], "--arch and --model are alternatives"),
        (["--backend", "instant", "--worker", "process"], "--worker process goes with"),
        (["--backend", "instant", "--image-size", "8000x6000"], "over the daemon's"),
        (["--image-size", "14000x14000"], "over the daemon's"),  # the model bench too
        (["--image-size", "70000x28"], "at most 65500 pixels"),
        (["--image-size", "6000x28"], "at most 100 times the other"),
        (["--image-size", "²²x100"], "expected WIDTHxHEIGHT"),  # digits int() cannot read
        (["--image-size", "27x100"], "each side at least 28 pixels"),
        (["--max-wait-ms", "nan"], "expected a number"),
        (["--max-batch", "1000"], "1<=x<=512"),
        (
            ["--backend", "instant", "--max-batch", "4", "--compile", "--dtype", "float32"],
            "leave out --max-batch, --compile, --dtype",
        ),
        (["--backend", "pipeline", "--baseline-alerts", "2"], "leave out --baseline-alerts"),
        (["--backend", "pipeline", "--baseline-new-tokens", "3"], "leave out --baseline-new"),
    ):
        result = CliRunner().invoke(main, ["bench", *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
