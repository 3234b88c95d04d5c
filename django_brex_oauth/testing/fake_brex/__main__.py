"""``python -m django_brex_oauth.testing.fake_brex``: serve a fake Brex until Ctrl-C."""

import sys

from .cli import main

sys.exit(main())
