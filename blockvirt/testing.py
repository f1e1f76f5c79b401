"""pytest plugin placeholder (filled below)."""
