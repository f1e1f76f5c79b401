"""Storage backends other than the local files: each in its own subpackage."""
