"""Prometheus metrics from one explicit registry; values are read from live state at scrape time."""
