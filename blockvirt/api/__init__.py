"""Management HTTP API (aiohttp) and /metrics."""
