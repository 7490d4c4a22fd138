"""Everything under OUT: the layout of its keys, the ledger (commit protocol, the only judge of
done), the checkpoint, the lease, the job log and its HTML report."""
