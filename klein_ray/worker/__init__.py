"""The render worker: one variant's model kept loaded, turning work units into committed rows
(fetch references, render on the model thread, encode, commit through the ledger). ``spec`` is
what a worker is started from; executors run workers, the driver never imports them."""
