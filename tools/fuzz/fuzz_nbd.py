#!/usr/bin/env python3
"""Coverage-guided fuzzing of the NBD codec with atheris (libFuzzer for Python).

    python tools/fuzz/fuzz_nbd.py TARGET [libFuzzer options] [CORPUS_DIR ...]
    python tools/fuzz/fuzz_nbd.py client_transmission -max_total_time=600 /tmp/corpus

TARGET is one of tools/fuzz/targets.py's TARGETS. libFuzzer writes new inputs into the first
corpus directory: give it a scratch copy of tests/fuzz/corpus/TARGET, and copy back only
inputs worth keeping (one that found a bug, once fixed). A crash leaves crash-* files where
-artifact_prefix points (default: the current directory).
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["blockvirt"]):
    from blockvirt.nbd.exceptions import RemoteProtocolError
    from tools.fuzz.targets import TARGETS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options] [corpus dirs]")
    target = TARGETS[sys.argv[1]]

    def one_input(data: bytes) -> None:
        try:
            target(data)
        except RemoteProtocolError:
            pass

    atheris.Setup([sys.argv[0], *sys.argv[2:]], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
