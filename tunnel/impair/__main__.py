"""``python -m tunnel.impair``: the jvpn-impair command."""

import sys

from tunnel.impair.main import main

sys.exit(main())
