"""Block graph: nodes, filters and drivers. Knows nothing of sockets or HTTP."""
