"""``python -m tunnel.cli``: the ``jvpn`` command."""

from tunnel.cli import main

raise SystemExit(main())
