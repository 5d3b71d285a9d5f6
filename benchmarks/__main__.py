"""``python -m benchmarks run|report`` (see benchmarks/cli.py)."""

from benchmarks.cli import main

raise SystemExit(main())
