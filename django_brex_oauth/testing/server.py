"""A :class:`FakeBrex` for a Django site: settings pointing at it, and a context manager.

Outside pytest (``unittest``, Django's test runner, a shell)::

    from django_brex_oauth.testing import fake_brex_server

    with fake_brex_server(access_token_ttl=60) as brex:
        ...  # BREX_OAUTH now points at ``brex``; the connect flow and API calls reach it

With pytest, the ``fake_brex`` and ``brex_oauth_settings`` fixtures of
:mod:`django_brex_oauth.testing.pytest_plugin` do the same.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from django.conf import settings

from .fake_brex import FakeBrex

#: The address of Django's test client: the ``SITE_URL`` a site that sets no callback URL of
#: its own gets from :func:`brex_oauth_settings_for`.
TEST_CLIENT_URL = "http://testserver"


def brex_oauth_settings_for(
    fake: FakeBrex, base: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``base`` (by default the current ``settings.BREX_OAUTH``) pointed at ``fake``.

    Only the issuer, the API server and the client credentials change; scopes, the
    encryption key and every other setting stay as the site configured them. A site that
    sets neither ``SITE_URL`` nor ``REDIRECT_URI`` gets ``SITE_URL`` ``http://testserver``,
    the address of Django's test client.
    """
    if base is None:
        base = getattr(settings, "BREX_OAUTH", None) or {}
    callback = {} if base.get("SITE_URL") or base.get("REDIRECT_URI") else {
        "SITE_URL": TEST_CLIENT_URL
    }
    return {
        **dict(base),
        **callback,
        "ISSUER": fake.issuer,
        "API_BASE_URL": fake.api_base_url,
        "CLIENT_ID": fake.client_id,
        "CLIENT_SECRET": fake.client_secret,
    }


@contextmanager
def fake_brex_server(**fake_options: Any) -> Iterator[FakeBrex]:
    """Start a :class:`FakeBrex` and point ``BREX_OAUTH`` at it until the block ends.

    ``fake_options`` go to :class:`FakeBrex` (``access_token_ttl=60``,
    ``redirect_uris=[...]``, ``users=[...]``, ...). Settings are overridden with
    :class:`django.test.override_settings`, so they are restored on the way out.
    """
    # Here, not at the top: the pytest plugin loads this module, and django.test the ORM.
    from django.test import override_settings

    with FakeBrex(**fake_options) as fake:
        with override_settings(BREX_OAUTH=brex_oauth_settings_for(fake)):
            yield fake
