"""``python -m app.cli``: the ``conveyor`` command (how ``conveyor dev`` starts its children)."""

import sys

from app.cli.main import main

sys.exit(main())
