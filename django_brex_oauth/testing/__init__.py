"""Test helpers for projects using django-brex-oauth.

``FakeBrex`` (a fake Brex OAuth server and API) is loaded on first use, so importing this package
stays cheap and ``python -m django_brex_oauth.testing.fake_brex`` runs cleanly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .fake_brex import FakeBrex

__all__ = ["FakeBrex"]


def __getattr__(name: str) -> Any:
    if name == "FakeBrex":
        from .fake_brex import FakeBrex

        return FakeBrex
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
