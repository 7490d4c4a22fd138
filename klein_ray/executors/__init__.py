"""Executors: *how* work units run. ``base`` is the interface the driver schedules through and
owns the loop every executor shares (submit, wait, outcomes, hung workers, relaunches); each
implementation supplies only its primitives: ``ray_cluster`` (Ray actors, the only module that
imports ray, with ``ray_metrics``) and ``inprocess`` (worker threads of this process)."""
