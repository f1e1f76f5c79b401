"""Filter nodes: features that change I/O, inserted into an export's graph above its backend."""
