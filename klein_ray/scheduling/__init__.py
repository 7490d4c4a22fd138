"""Scheduling: the driver (what runs, when, and what an outcome means), the retry policy, the
start of each variant's worker pool, how a run stops, and what it reports while it runs. It
reaches workers only through the ``Executor`` interface (``klein_ray.executors.base``)."""
