"""Communication accounting: every byte is counted in :mod:`fedtune.comm.ledger`."""
