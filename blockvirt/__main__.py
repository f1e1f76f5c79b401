from __future__ import annotations

import sys

from blockvirt.cli.main import main

sys.exit(main())
