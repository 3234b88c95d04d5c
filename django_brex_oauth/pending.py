"""The authorizations a browser session has started and not finished: the ``state`` of each
is kept in the session, so that a callback is taken only in the session that started it.

The states themselves (PKCE verifier, nonce, expiry, team) are
:class:`~django_brex_oauth.models.AuthorizationRequest` rows, written and used up by the
connect service; the session holds only which of them are its own.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.contrib.sessions.backends.base import SessionBase

SESSION_KEY = "brex_oauth_pending_states"
#: How many unfinished authorizations one session keeps (the oldest is forgotten first).
MAX_PENDING_PER_SESSION = 5


def remember(session: SessionBase, state: str) -> None:
    """Record that ``session`` started the authorization with ``state``."""
    pending = [s for s in session.get(SESSION_KEY, []) if s != state]
    session[SESSION_KEY] = (pending + [state])[-MAX_PENDING_PER_SESSION:]


def take(session: SessionBase, state: str) -> bool:
    """Forget ``state`` in ``session``; True when the session had started it."""
    return bool(take_all(session, [state]))


def take_all(session: SessionBase, states: Iterable[str]) -> list[str]:
    """Forget each of ``states`` ``session`` had started; the ones it had, in order."""
    pending = session.get(SESSION_KEY, [])
    taken = [s for s in states if s and s in pending]
    if taken:
        session[SESSION_KEY] = [s for s in pending if s not in taken]
    return taken
