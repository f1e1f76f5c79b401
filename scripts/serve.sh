#!/usr/bin/env bash
# Install (if needed) and run blockvirt on its embedded defaults:
# data in ./blockvirt-data, NBD on 127.0.0.1:10809, API and /metrics on 127.0.0.1:9810.
# Extra arguments go to `blockvirt serve`.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
"$here/scripts/setup.sh"
exec "$here/.venv/bin/blockvirt" serve "$@"
