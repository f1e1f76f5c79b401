"""Command line: `blockvirt serve` and the management commands (over the HTTP API)."""
