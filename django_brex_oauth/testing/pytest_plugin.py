"""pytest fixtures for sites using django-brex-oauth.

Installing the package registers this plugin with pytest (the ``pytest11`` entry point,
named after this module); the fixtures need pytest-django, which the ``testing`` extra
brings (``pip install "django-brex-oauth[testing]"``). Then::

    def test_dashboard_shows_the_company(client, user, brex_oauth_settings, fake_brex):
        connection = make_connection(user, fake=fake_brex)
        ...

* ``fake_brex``: a :class:`~django_brex_oauth.testing.FakeBrex` listening on loopback,
  fresh for each test;
* ``brex_oauth_settings``: pytest-django's ``settings`` with ``BREX_OAUTH`` pointing at
  ``fake_brex`` (issuer, API server, client id and secret; the rest as configured).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .fake_brex import FakeBrex
from .server import brex_oauth_settings_for


@pytest.fixture
def fake_brex() -> Iterator[FakeBrex]:
    """A fake Brex server on loopback, fresh for each test."""
    with FakeBrex() as server:
        yield server


@pytest.fixture
def brex_oauth_settings(settings: Any, fake_brex: FakeBrex) -> Any:
    """pytest-django's ``settings`` with ``BREX_OAUTH`` pointing at ``fake_brex``."""
    settings.BREX_OAUTH = brex_oauth_settings_for(
        fake_brex, getattr(settings, "BREX_OAUTH", None) or {}
    )
    return settings
