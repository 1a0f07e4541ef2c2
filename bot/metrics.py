"""Prometheus metrics of one server: deliveries, jobs, queue, locks, forge API errors."""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bot.store import Store

disable_created_metrics()  # the *_created series only double the scrape size

JOB_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class _StoreGauges(Collector):
    """Queue depth and locks, read from the store at scrape time (they live there, not here)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("deploybot_queue_depth", "Jobs waiting to run", value=self.store.queue_depth())
        yield GaugeMetricFamily("deploybot_locks", "Projects locked by a pull request", value=self.store.lock_count())


class Metrics:
    """The server's metrics, in a registry of its own."""

    def __init__(self, store: Store) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.deliveries = Counter("deploybot_deliveries", "Webhook deliveries by forge, event and outcome",
                                  ["forge", "event", "outcome"], registry=self.registry)
        self.job_seconds = Histogram("deploybot_job_duration_seconds", "Job durations by command and outcome",
                                     ["command", "outcome"], buckets=JOB_BUCKETS, registry=self.registry)
        self.forge_errors = Counter("deploybot_forge_api_errors", "Failed forge API calls by forge",
                                    ["forge"], registry=self.registry)
        self.registry.register(_StoreGauges(store))

    def render(self) -> bytes:
        """The Prometheus text format."""
        return generate_latest(self.registry)
