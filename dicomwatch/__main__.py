"""Allow ``python -m dicomwatch``."""

from dicomwatch.cli import main

raise SystemExit(main())
