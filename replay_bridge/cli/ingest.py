"""``replay-bridge ingest``: offline conversion of dumped engine traffic (in progress)."""
