"""Prometheus metrics at `GET /metrics`, built from the daemon's own counters at each scrape.

Counters come from the pipeline's StageStats events (alerts received, verdicts, publish
failures, rule reload errors; the model worker's busy time), histograms from its stage
timings and the model worker's batch sizes, gauges from the backlog, the journal and the rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from daemon.stats import BUCKETS_S, STAGES, StageStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class _Snapshot:
    """A collector that yields metric families computed beforehand."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def render(stats: StageStats, gauges: Mapping[str, float], worker: Mapping[str, Any]) -> bytes:
    """The Prometheus text format of everything the daemon counts."""
    registry = CollectorRegistry(auto_describe=False)
    families = [*_counters(stats), *_stages(stats), *_batches(worker), *_gauges(gauges)]
    registry.register(_Snapshot(families))  # type: ignore[arg-type]
    return generate_latest(registry)


#: event name -> (metric name, help, label names)
EVENTS = {
    "alerts_received": (
        "secondlook_alerts_received",
        "Alert payloads taken in, by source and outcome "
        "(accepted, duplicate, refused, busy, consumed)",
        ("source", "outcome"),
    ),
    "verdicts": ("secondlook_verdicts", "Verdicts made, by rule and verdict", ("rule", "verdict")),
    "publish_failures": (
        "secondlook_publish_failures",
        "Verdict publishes the broker did not acknowledge (they are retried)",
        (),
    ),
    "publish_refused": (
        "secondlook_publish_refused",
        "Verdicts the broker refused (MQTT 5 reason code): kept, retried on SIGHUP or restart",
        (),
    ),
    "rule_reload_errors": (
        "secondlook_rule_reload_errors",
        "Rule files refused at a reload",
        (),
    ),
    "feedback": (
        "secondlook_feedback",
        "Operator feedback on verdicts, by rule and whether the verdict was right",
        ("rule", "correct"),
    ),
}

GAUGES = {
    "queued": "Alerts waiting for review in memory",
    "backlog": "Alerts journalled but not reviewed",
    "unpublished": "Verdicts journalled but not yet acknowledged by the broker",
    "intake_paused": "1 while intake is paused (backlog full, disk short)",
    "rule_errors": "Rule files currently refused",
    "rules": "Rules loaded",
    "model_waiting": "Requests waiting for the model",
    "model_busy_for_seconds": "How long the model's current pass has run (0: idle)",
    "model_batch_limit": "The largest batch formed now: max_batch, or less since a batch ran "
    "out of memory",
    "healthy": "1 while /healthz answers ok (0: starting, stopping, or the model worker "
    "failed, ended or is stuck)",
}


#: the model worker's own counts
WORKER_COUNTERS = {
    "failures": "Model passes (remote: requests) that failed, other than by running out of "
    "memory and splitting",
    "oom_splits": "Batches split in halves after running out of memory",
}


def _counters(stats: StageStats) -> Iterable[Metric]:
    events = stats.events()
    for event, (name, help_text, labels) in EVENTS.items():
        family = CounterMetricFamily(name, help_text, labels=labels)
        for (seen, pairs), value in sorted(events.items()):
            if seen == event:
                values = dict(pairs)
                family.add_metric([values.get(label, "") for label in labels], value)
        if not labels and not family.samples:
            family.add_metric([], 0)
        yield family


def _stages(stats: StageStats) -> Iterable[Metric]:
    family = HistogramMetricFamily(
        "secondlook_stage_seconds",
        "Wall time per pipeline stage and alert (model: waiting for and running the batch)",
        labels=["stage"],
    )
    for stage in STAGES:
        cumulative, total, count = stats.histogram(stage)
        buckets = [(_bound(b), c) for b, c in zip(BUCKETS_S, cumulative, strict=True)]
        family.add_metric([stage], [*buckets, ("+Inf", count)], total)
    yield family


def _batches(worker: Mapping[str, Any]) -> Iterable[Metric]:
    sizes: Mapping[int, int] = worker.get("batch_sizes") or {}
    family = HistogramMetricFamily(
        "secondlook_batch_size", "Requests per model pass (batch size)", labels=[]
    )
    buckets = [(_bound(b), sum(n for s, n in sizes.items() if s <= b)) for b in BATCH_BUCKETS]
    total = sum(size * n for size, n in sizes.items())
    family.add_metric([], [*buckets, ("+Inf", sum(sizes.values()))], total)
    yield family
    if "busy_s" in worker:
        yield CounterMetricFamily(
            "secondlook_model_busy_seconds",
            "Seconds the model spent in passes (its rate: the share of time the device works)",
            value=worker["busy_s"],
        )
    for key, help_text in WORKER_COUNTERS.items():
        if key in worker:
            yield CounterMetricFamily(f"secondlook_model_{key}", help_text, value=worker[key])


def _gauges(gauges: Mapping[str, float]) -> Iterable[Metric]:
    for key, help_text in GAUGES.items():
        if key in gauges:
            yield GaugeMetricFamily(f"secondlook_{key}", help_text, value=gauges[key])


def _bound(value: float) -> str:
    return f"{value:g}"
