"""`python -m meshpost` runs the CLI."""

from meshpost.cli import main

raise SystemExit(main())
