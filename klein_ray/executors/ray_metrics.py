"""Run metrics exported through Ray (``ray.util.metrics``): Prometheus scrapes them from each
node's metrics endpoint (``ray start --metrics-export-port``), named and tagged as
``executors/metrics.py`` lists. Imported only by the Ray executor."""

from __future__ import annotations

from klein_ray.executors.metrics import RunMetrics

# Seconds: sub-second stages on a GPU, minutes for a first model download.
BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800]


class RayMetrics(RunMetrics):
    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self._committed = Counter("klein_ray_rows_committed", description="Rows committed by this run.",
                                  tag_keys=("variant",))
        self._failed = Counter("klein_ray_rows_failed", description="Rows failed for good, by stage.",
                               tag_keys=("variant", "stage"))
        self._stage = Histogram("klein_ray_stage_seconds", description="Per-row seconds of each stage.",
                                boundaries=BOUNDARIES, tag_keys=("variant", "stage"))
        self._in_flight = Gauge("klein_ray_units_in_flight", description="Units submitted, not yet back.",
                                tag_keys=("variant",))
        self._load = Histogram("klein_ray_model_load_seconds", description="One worker's model load.",
                               boundaries=BOUNDARIES, tag_keys=("variant",))

    def committed(self, variant: str, n: int) -> None:
        if n:
            self._committed.inc(n, tags={"variant": variant})

    def failed(self, variant: str, stage: str, n: int) -> None:
        if n:
            self._failed.inc(n, tags={"variant": variant, "stage": stage})

    def stage_seconds(self, variant: str, stage: str, seconds: float) -> None:
        self._stage.observe(seconds, tags={"variant": variant, "stage": stage})

    def units_in_flight(self, variant: str, n: int) -> None:
        self._in_flight.set(n, tags={"variant": variant})

    def model_load_seconds(self, variant: str, seconds: float) -> None:
        self._load.observe(seconds, tags={"variant": variant})
