"""``python -m pytest_hwfault.report``."""

from .cli import main

raise SystemExit(main())
