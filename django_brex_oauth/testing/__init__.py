"""Test helpers for projects using django-brex-oauth.

* :class:`FakeBrex`: a fake Brex OAuth server and API on a loopback port;
* :func:`fake_brex_server`: a context manager that starts one and points ``BREX_OAUTH`` at it;
* :func:`brex_oauth_settings_for`: the ``BREX_OAUTH`` dict pointing at a fake;
* :func:`make_connection`: a connection with valid, expired or no tokens;
* :mod:`django_brex_oauth.testing.pytest_plugin`: the ``fake_brex`` and
  ``brex_oauth_settings`` pytest fixtures.

Names are loaded on first use, so importing this package stays cheap (no Django models)
and ``python -m django_brex_oauth.testing.fake_brex`` runs cleanly.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .factories import make_connection
    from .fake_brex import FakeBrex
    from .server import brex_oauth_settings_for, fake_brex_server

__all__ = ["FakeBrex", "brex_oauth_settings_for", "fake_brex_server", "make_connection"]

_HOMES = {
    "FakeBrex": ".fake_brex",
    "brex_oauth_settings_for": ".server",
    "fake_brex_server": ".server",
    "make_connection": ".factories",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
