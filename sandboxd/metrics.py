"""Prometheus text exposition (format 0.0.4) for the few series the service keeps: counters,
gauges read at scrape time, and histograms. Everything runs on the event loop: no locks."""

from __future__ import annotations

import bisect
import math
from typing import Callable

LabelValues = tuple[str, ...]
DURATION_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: LabelValues, extra: str = "") -> str:
    parts = [f'{name}="{_escape(value)}"' for name, value in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help_text, label_names
        self._values: dict[LabelValues, float] = {}

    def inc(self, *label_values: str, amount: float = 1.0) -> None:
        self._values[label_values] = self._values.get(label_values, 0.0) + amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for values, total in sorted(self._values.items()):
            lines.append(f"{self.name}{_labels(self.label_names, values)} {_number(total)}")
        return lines


class Gauge:
    """A value read when scraped (queue depth, running jobs)."""

    def __init__(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.name, self.help, self._read = name, help_text, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {_number(self._read())}"]


class Histogram:
    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...] = (),
                 buckets: tuple[float, ...] = DURATION_BUCKETS_S) -> None:
        self.name, self.help, self.label_names, self.buckets = name, help_text, label_names, buckets
        self._series: dict[LabelValues, tuple[list[int], list[float]]] = {}  # counts per bucket; [sum]

    def observe(self, value: float, *label_values: str) -> None:
        counts, total = self._series.setdefault(label_values, ([0] * (len(self.buckets) + 1), [0.0]))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        total[0] += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for values, (counts, total) in sorted(self._series.items()):
            cumulative = 0
            for bound, count in zip((*self.buckets, math.inf), counts):
                cumulative += count
                le = 'le="' + _number(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, values, le)} {cumulative}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, values)} {_number(total[0])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, values)} {cumulative}")
        return lines


class Registry:
    def __init__(self) -> None:
        self._metrics: list[Counter | Gauge | Histogram] = []

    def add(self, metric):
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        return "\n".join(line for metric in self._metrics for line in metric.render()) + "\n"


class ServiceMetrics:
    """The service's series. Gauges are bound later, when the scheduler exists."""

    def __init__(self) -> None:
        self.registry = Registry()
        self.jobs_finished = self.registry.add(Counter(
            "sandboxd_jobs_finished_total", "Jobs that ended, by result status (or cancelled).", ("status",)))
        self.jobs_submitted = self.registry.add(Counter(
            "sandboxd_jobs_submitted_total", "Jobs accepted into the queue."))
        self.job_duration = self.registry.add(Histogram(
            "sandboxd_job_duration_seconds", "Wall time of finished jobs, from start to end."))
        self.request_duration = self.registry.add(Histogram(
            "sandboxd_http_request_duration_seconds", "HTTP request handling time.", ("method", "route", "code")))

    def bind_gauges(self, queue_depth: Callable[[], float], running: Callable[[], float]) -> None:
        self.registry.add(Gauge("sandboxd_queue_depth", "Jobs waiting to run.", queue_depth))
        self.registry.add(Gauge("sandboxd_jobs_running", "Jobs running now.", running))
