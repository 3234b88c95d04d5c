"""The test settings with team-owned connections: ``BREX_OAUTH_TEAM_MODEL`` is set.

A swappable model setting shapes the tables, so the team-mode tests run in their own
pytest process with these settings (tests/test_teams.py starts it).
"""

from tests.settings import *  # noqa: F403

BREX_OAUTH_TEAM_MODEL = "teams_app.Team"

# Its own test database, beside the one the main suite's process holds.
DATABASES["default"].setdefault("TEST", {})  # noqa: F405
if DATABASES["default"]["ENGINE"] != "django.db.backends.sqlite3":  # noqa: F405
    DATABASES["default"]["TEST"]["NAME"] = "test_{}_teams".format(  # noqa: F405
        DATABASES["default"]["NAME"]  # noqa: F405
    )
