"""Run metrics: the events a run reports (``RunMetrics``, which exports nothing; the Ray
executor's ``RayMetrics`` in ``executors/ray_metrics.py`` exports them through ``ray.util.metrics``).

Metric names (Ray prefixes ``ray_``; counters end in ``_total``):
| name | kind | tags | what |
|---|---|---|---|
| ``klein_ray_rows_committed`` | counter | variant | rows committed by this run |
| ``klein_ray_rows_failed`` | counter | variant, stage | rows failed for good (fetch, render, encode, store, input) |
| ``klein_ray_stage_seconds`` | histogram | variant, stage | per-row seconds of fetch, render, encode, store |
| ``klein_ray_units_in_flight`` | gauge | variant | units submitted and not yet back |
| ``klein_ray_model_load_seconds`` | histogram | variant | one worker's model load |
"""

from __future__ import annotations


class RunMetrics:
    """Where run events go as metrics; this base exports nothing."""

    def committed(self, variant: str, n: int) -> None: ...

    def failed(self, variant: str, stage: str, n: int) -> None: ...

    def stage_seconds(self, variant: str, stage: str, seconds: float) -> None: ...

    def units_in_flight(self, variant: str, n: int) -> None: ...

    def model_load_seconds(self, variant: str, seconds: float) -> None: ...
