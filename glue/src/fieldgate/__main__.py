"""Allow ``python -m fieldgate``."""

from fieldgate.cli import main

raise SystemExit(main())
