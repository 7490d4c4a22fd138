"""The Ray executor's tasks (``map_tasks``): run anywhere on the cluster, in order, at most
``in_flight`` at once, an application error raised as itself for its item."""

from __future__ import annotations

import pytest

from klein_ray.executors.ray_cluster import RayExecutor


def test_tasks_on_ray_keep_order_and_raise_their_own_errors(ray_address):
    def square(n: int) -> int:  # defined here: Ray ships it to the workers by value
        return n * n

    def inverse(n: int) -> int:
        return 1 // n

    executor = RayExecutor()
    assert list(executor.map_tasks(square, range(12), in_flight=4, num_cpus=0.5)) == [n * n for n in range(12)]
    results = executor.map_tasks(inverse, [1, 0], in_flight=2, num_cpus=0.5)
    assert next(results) == 1
    with pytest.raises(ZeroDivisionError):
        next(results)
