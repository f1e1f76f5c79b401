#!/usr/bin/env bash
# Install everything the test suite needs, then lint, type-check and run the whole suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
export PATH="$PWD/.venv/bin:$PATH"
# Missing real clients must fail the run, not skip tests.
export BLOCKVIRT_REQUIRE_INTEROP=1
echo "== ruff"
ruff check blockvirt tests tools
echo "== mypy"
mypy
echo "== pytest"
python -m pytest "$@"
