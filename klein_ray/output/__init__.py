"""Everything under OUT: the layout of its keys, the ledger (commit protocol and the one
predicate that says a row is committed), the output record (marker fields, fingerprint), the
checkpoint, the lease, auditing, the job log and its HTML report."""
