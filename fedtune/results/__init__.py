"""Run directories: config, per-round metrics, the ledger, the summary, the adapter."""
