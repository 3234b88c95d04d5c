"""When this site may call Brex: Retry-After, the sweep's rate budget, a refused client.

Three kinds of shared state, each a :class:`~django_brex_oauth.models.BrexThrottle` row in
the database, so that every process on every host sees the same thing (the Django cache
may be per process):

* a **not-before time** per scope: Brex answered 429 (or 503) with ``Retry-After``, so no
  process calls that part of Brex again before then. The token endpoint and the revocation
  endpoint are limited per client; the API per client and Brex account, so an API wait
  holds back only the calls for that account;
* the **sweep's rate budget**: a fixed-window counter (``SWEEP_RATE_LIMIT`` token requests
  per ``SWEEP_RATE_WINDOW`` seconds) taken with one conditional ``UPDATE``, so that many
  workers refreshing at once stay under Brex's limit together;
* the **client pause**: Brex refused the site's client credentials (``invalid_client``).
  That is the site's configuration, not any customer's connection, so connections stay
  active while refreshing pauses everywhere; one caller probes the credentials every
  ``CLIENT_REJECTED_PROBE_INTERVAL`` seconds and refreshing resumes when they work.

Times are the database's (``NOW()``), so hosts' clocks do not matter. A process answers
"may I call Brex now?" from one reading of every wait in force, taken at most
``SNAPSHOT_SECONDS`` (1 s) earlier, so the check costs no query per refresh or API call: a
wait recorded by another process holds this one back at most that long after it was
recorded, one recorded by this process at once; a wait in force is read afresh at every
check.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from django.db import connections, router, transaction
from django.db.models import Case, F, Q, When
from django.db.models.functions import Now

from .. import oauth, signals
from ..conf import AUTH_BASE_URLS, brex_settings
from ..db import update_sql
from ..exceptions import BrexOAuthError, BrexUnavailable, InvalidClient, RefreshPaused, TokenError
from ..models import BrexConnection, BrexThrottle, ThrottleReason

logger = logging.getLogger("django_brex_oauth")


# Scopes ----------------------------------------------------------------------------------


def environments() -> list[str]:
    """Every Brex environment a connection may talk to, the configured one first."""
    configured = brex_settings.environment
    return [configured, *(name for name in AUTH_BASE_URLS if name != configured)]


def _client_key(environment: str | None = None) -> str:
    # Brex limits per client and per Brex: connections made in the other environment call
    # that environment's issuer (``issuer_for``), whose 429s and refusals say nothing about
    # this one's. Keyed by the issuer actually called and the client id, so that switching
    # either keeps the waits apart. A digest keeps the scope short and readable.
    material = f"{brex_settings.issuer_for(environment)}\n{brex_settings.CLIENT_ID}"
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def token_scope(environment: str | None = None) -> str:
    """The token endpoint (refresh, code exchange, client credentials) of this client, at
    the Brex of ``environment`` (None: the configured one)."""
    return f"token:{_client_key(environment)}"


def revocation_scope() -> str:
    """The revocation endpoint of this client."""
    return f"revocation:{_client_key()}"


def client_scope(environment: str | None = None) -> str:
    """Where the client pause (Brex refused the client credentials) is kept, per Brex
    environment (None: the configured one)."""
    return f"client:{_client_key(environment)}"


def sweep_scope() -> str:
    """The sweep's rate budget of this client."""
    return f"sweep:{_client_key()}"


def api_scope(connection: BrexConnection | None) -> str:
    """The API for one Brex account (the connection's company; the connection itself when
    its company is unknown), or the onboarding API (``None``), which is per client."""
    if connection is None:
        account = "onboarding"
    else:
        account = connection.brex_company_id or f"connection-{connection.pk}"
    environment = None if connection is None else connection.environment
    return f"api:{_client_key(environment)}:{account}"[:200]


def _rows(scope: str):
    return BrexThrottle.objects.filter(scope=scope)


def _ensure(scope: str) -> None:
    BrexThrottle.objects.get_or_create(scope=scope)


def _seconds(delta: timedelta | None) -> float:
    return 0.0 if delta is None else max(0.0, delta.total_seconds())


# What this process last read of the waits in force -----------------------------------------

#: How long, in seconds, a process answers "nothing holds me back" from its last reading of
#: the waits in force instead of asking the database: a wait that another process records
#: holds this one back at most this long after it was recorded (one this process records,
#: at once). It keeps the check off the hot path: one query a second per process, not one
#: per refresh or API call. While a wait holds a call back it is read afresh each time.
SNAPSHOT_SECONDS = 1.0


@dataclass(frozen=True)
class _Wait:
    reason: str
    detail: str
    #: Seconds left by the database's clock when it was read (``not_before`` - now).
    left: float


@dataclass(frozen=True)
class _Snapshot:
    read_at: float
    waits: dict[str, _Wait]

    def left(self, wait: _Wait) -> float:
        return max(0.0, wait.left - (time.monotonic() - self.read_at))


_snapshot: _Snapshot | None = None


def _waits(*scopes: str) -> _Snapshot:
    """Every wait in force, as read at most ``SNAPSHOT_SECONDS`` ago; read again now when
    that reading has a wait for one of ``scopes``. Only "nothing holds these back" is
    answered from memory: a wait in force is always read fresh, so that it ends in every
    process the moment it ends in the database."""
    global _snapshot
    snapshot = _snapshot
    if (
        snapshot is None
        or time.monotonic() - snapshot.read_at > SNAPSHOT_SECONDS
        or any(scope in snapshot.waits for scope in scopes)
    ):
        rows = (
            BrexThrottle.objects.filter(
                Q(reason=ThrottleReason.CLIENT_REJECTED)
                | Q(reason=ThrottleReason.RETRY_AFTER, not_before__gt=Now())
            )
            .annotate(left=F("not_before") - Now())
            .values_list("scope", "reason", "detail", "left")
        )
        snapshot = _Snapshot(time.monotonic(), {
            scope: _Wait(reason, detail, _seconds(left)) for scope, reason, detail, left in rows
        })
        _snapshot = snapshot
    return snapshot


def forget_waits() -> None:
    """Read the waits from the database at the next check (after this process changed
    them, or a test rolled them back)."""
    global _snapshot
    _snapshot = None


# Not-before times (Retry-After) ------------------------------------------------------------


def hold(scope: str, seconds: float, detail: str) -> None:
    """Make every process wait ``seconds`` before its next request in ``scope``.

    Never shortens a wait already in place. ``detail`` is shown to staff and must be
    log-safe.
    """
    if seconds <= 0:
        return
    until = Now() + timedelta(seconds=seconds)
    changes = {
        "not_before": Case(When(not_before__gt=until, then=F("not_before")), default=until),
        "since": Case(When(not_before__gt=Now(), then=F("since")), default=Now()),
        "reason": ThrottleReason.RETRY_AFTER,
        "detail": detail[:1000],
    }
    if not _rows(scope).update(**changes):
        _ensure(scope)
        _rows(scope).update(**changes)
    forget_waits()
    logger.warning(
        "Brex asked this site to wait %.0f s (Retry-After) in %s: %s. Every worker waits.",
        seconds, scope.split(":", 1)[0], detail,
    )


def hold_for(scope: str, err: BrexUnavailable) -> None:
    """:func:`hold` for as long as ``err`` says Brex asked (nothing if it did not)."""
    if err.retry_after:
        hold(scope, err.retry_after, str(err))


def wait_left(scope: str) -> float:
    """Seconds left before a request in ``scope`` may be sent (0 when it may go now), as
    read at most ``SNAPSHOT_SECONDS`` ago."""
    snapshot = _waits(scope)
    wait = snapshot.waits.get(scope)
    if wait is None or wait.reason != ThrottleReason.RETRY_AFTER:
        return 0.0
    return min(snapshot.left(wait), brex_settings.RETRY_AFTER_MAX)


def _too_soon(what: str, left: float) -> BrexUnavailable:
    return BrexUnavailable(
        f"Brex asked to wait {left:.0f} s more before the next request to {what} "
        "(Retry-After).",
        status=429,
        retry_after=left,
    )


def wait_for(
    scope: str,
    what: str,
    *,
    max_wait: float = 0.0,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Return once a request in ``scope`` may be sent: sleep through a wait of at most
    ``max_wait`` seconds, raise :class:`BrexUnavailable` (with ``retry_after``) for a
    longer one, so that a worker is not tied up and the caller can come back later."""
    left = wait_left(scope)
    if left <= 0:
        return
    if left > max_wait:
        raise _too_soon(what, left)
    sleep(left)


# The token endpoint: Retry-After and the client pause --------------------------------------


def before_token_request(
    *,
    max_wait: float = 0.0,
    sleep: Callable[[float], None] = time.sleep,
    environment: str | None = None,
) -> None:
    """Return once this site may ask the token endpoint of ``environment``'s Brex (None:
    the configured one) to refresh, answered from this process's reading of the waits in
    force (at most ``SNAPSHOT_SECONDS`` old; no query at all on most calls).

    Raises :class:`BrexUnavailable` while Brex's ``Retry-After`` runs (after sleeping
    through up to ``max_wait`` seconds of it), and :class:`RefreshPaused` while Brex
    refuses the client credentials. Once a pause's probe time has come, exactly one caller
    (across every process) probes the credentials; when they work, the pause ends and that
    caller goes on.
    """
    token, client = token_scope(environment), client_scope(environment)
    snapshot = _waits(token, client)
    retry = snapshot.waits.get(token)
    if retry is not None and retry.reason == ThrottleReason.RETRY_AFTER:
        left = min(snapshot.left(retry), brex_settings.RETRY_AFTER_MAX)
        if left > max_wait:
            raise _too_soon("the token endpoint", left)
        if left > 0:
            sleep(left)
    pause = snapshot.waits.get(client)
    if pause is not None and pause.reason == ThrottleReason.CLIENT_REJECTED:
        left = snapshot.left(pause)
        if left > 0 or not _take_probe(environment):
            raise _paused(pause.detail, max(left, 1.0))
        _probe(environment)


def _paused(detail: str, left: float) -> RefreshPaused:
    reason = detail or "Brex refused this site's client credentials"
    return RefreshPaused(
        f"Refreshing is paused for every connection: {reason}. Next probe in {left:.0f} s.",
        retry_after=left,
    )


def _pause_detail(environment: str | None) -> str:
    pause = client_pause(environment)
    return pause.detail if pause is not None else ""


def _take_probe(environment: str | None) -> bool:
    """Claim the one probe of a pause whose probe time has come: the winner moves the next
    probe time on, so every other caller keeps waiting."""
    interval = timedelta(seconds=brex_settings.CLIENT_REJECTED_PROBE_INTERVAL)
    taken = bool(
        _rows(client_scope(environment))
        .filter(reason=ThrottleReason.CLIENT_REJECTED, not_before__lte=Now())
        .update(not_before=Now() + interval)
    )
    forget_waits()
    return taken


def _probe(environment: str | None) -> None:
    """Ask the token endpoint of ``environment``'s Brex whether it accepts the client
    credentials now (without issuing anything); end that pause if it does, else raise
    :class:`RefreshPaused`."""
    interval = brex_settings.CLIENT_REJECTED_PROBE_INTERVAL
    try:
        oauth.verify_client_credentials(issuer=brex_settings.issuer_for(environment))
    except InvalidClient as err:
        client_rejected(err, environment=environment)
        raise _paused(_pause_detail(environment), interval) from err
    except BrexUnavailable as err:
        hold_for(token_scope(environment), err)
        raise _paused(_pause_detail(environment), interval) from err
    except BrexOAuthError as err:
        logger.error("Probing Brex's client credentials failed: %s", err)
        raise _paused(_pause_detail(environment), interval) from err
    client_accepted(environment)


def client_rejected(
    err: TokenError,
    *,
    connection: BrexConnection | None = None,
    environment: str | None = None,
) -> bool:
    """Brex refused the client credentials: pause refreshing for every connection of
    ``environment`` (the connection's when one is given; else None: the configured one),
    the Brex that refused them.

    Logs an ERROR every time; the first refusal of a pause also sends
    :data:`~django_brex_oauth.signals.client_credentials_rejected` (after the commit).
    Returns True when this call started the pause.
    """
    if connection is not None:
        environment = connection.environment
    interval = timedelta(seconds=brex_settings.CLIENT_REJECTED_PROBE_INTERVAL)
    detail = f"Brex refused this site's client credentials ({err.error})"
    if (environment or brex_settings.environment) != brex_settings.environment:
        detail += f" in {environment}"
    scope = client_scope(environment)
    _ensure(scope)
    started = bool(
        _rows(scope)
        .exclude(reason=ThrottleReason.CLIENT_REJECTED)
        .update(reason=ThrottleReason.CLIENT_REJECTED, since=Now(), not_before=Now() + interval,
                detail=detail)
    )
    if not started:
        _rows(scope).update(not_before=Now() + interval, detail=detail)
    forget_waits()
    logger.error(
        "%s: refreshing is paused for every Brex connection; connections stay active. Fix "
        "BREX_OAUTH CLIENT_ID / CLIENT_SECRET; refreshing resumes by itself once they work "
        "(probed every %.0f s, or run manage.py brex_oauth_check).",
        detail, interval.total_seconds(),
    )
    if started:
        error, description = err.error, err.description
        transaction.on_commit(
            lambda: signals.client_credentials_rejected.send(
                sender=BrexConnection, connection=connection, error=error,
                description=description,
            )
        )
    return started


def client_accepted(environment: str | None = None) -> bool:
    """Brex (of ``environment``; None: the configured one) accepts the client credentials:
    end its pause. True when there was one."""
    ended = bool(
        _rows(client_scope(environment))
        .filter(reason=ThrottleReason.CLIENT_REJECTED)
        .update(reason="", not_before=None, since=None, detail="")
    )
    forget_waits()
    if ended:
        logger.warning("Brex accepts this site's client credentials again; refreshing resumes.")
    return ended


def client_pause(environment: str | None = None) -> BrexThrottle | None:
    """The client pause in force for ``environment`` (None: the configured one), or None.
    ``left`` is the time to the next probe."""
    return (
        _rows(client_scope(environment))
        .filter(reason=ThrottleReason.CLIENT_REJECTED)
        .annotate(left=F("not_before") - Now())
        .first()
    )


def active_waits() -> list[BrexThrottle]:
    """Every wait in force (a Retry-After still running, or the client pause), for staff."""
    return list(
        BrexThrottle.objects.filter(
            Q(reason=ThrottleReason.CLIENT_REJECTED)
            | Q(reason=ThrottleReason.RETRY_AFTER, not_before__gt=Now())
        ).order_by("scope")
    )


# The sweep's rate budget ------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetTicket:
    """The answer of :func:`take_sweep_budget`."""

    granted: bool
    #: Seconds until the current window ends (when a refused caller may try again).
    resets_in: float = 0.0


def _window() -> timedelta:
    return timedelta(seconds=max(1.0, brex_settings.SWEEP_RATE_WINDOW))


def take_sweep_budget() -> BudgetTicket:
    """Take one token request from the sweep's shared budget, or learn when to try again.

    A fixed window of ``SWEEP_RATE_WINDOW`` seconds allowing ``SWEEP_RATE_LIMIT`` requests,
    counted in one row: taking is one conditional ``UPDATE``, which PostgreSQL re-checks
    after a concurrent writer commits and SQLite serialises, so the workers of every host
    together never exceed it. The first refusal in a window logs a WARNING, and the first
    take of a new window logs how much of the last one was used.
    """
    limit = brex_settings.SWEEP_RATE_LIMIT
    window = _window()
    rows = _rows(sweep_scope())
    for _ in range(5):
        if rows.filter(window_started_at__gt=Now() - window, window_used__lt=limit).update(
            window_used=F("window_used") + 1
        ):
            return BudgetTicket(True)
        row = rows.annotate(age=Now() - F("window_started_at")).first()
        if row is None:
            _ensure(sweep_scope())
            continue
        if row.window_started_at is None or _seconds(row.age) >= window.total_seconds():
            expired = Q(window_started_at__isnull=True) | Q(window_started_at__lte=Now() - window)
            if rows.filter(expired).update(
                window_started_at=Now(), window_used=1, window_refused=0
            ):
                if row.window_used:
                    logger.info(
                        "Brex refresh budget: the last window used %s of %s token requests "
                        "(%s deferred to a later window).",
                        row.window_used, limit, row.window_refused,
                    )
                return BudgetTicket(True)
            continue
        if rows.filter(window_started_at__gt=Now() - window, window_used__gte=limit).update(
            window_refused=F("window_refused") + 1
        ):
            resets_in = max(0.0, window.total_seconds() - _seconds(row.age))
            if row.window_refused == 0:
                logger.warning(
                    "Brex refresh budget used up: %s of %s token requests in this %.0f s "
                    "window; the sweep defers further refreshes for %.1f s "
                    "(SWEEP_RATE_LIMIT).",
                    row.window_used, limit, window.total_seconds(), resets_in,
                )
            return BudgetTicket(False, resets_in)
    # Windows kept turning over under us: let the caller come back very soon.
    return BudgetTicket(False, 1.0)


def sweep_budget_sql() -> tuple[str, tuple] | None:
    """The ``UPDATE`` that takes one request from the sweep's budget when the current
    window has room, as SQL and parameters, for
    :func:`~django_brex_oauth.services.lease.claim_and_load_then` to run with the claim (in
    its statement or its transaction); None where the database cannot return rows from an
    ``UPDATE``. :func:`take_sweep_budget` does the rest (a new window, a refusal and its
    log line)."""
    scope, window, limit = sweep_scope(), _window(), brex_settings.SWEEP_RATE_LIMIT
    alias = router.db_for_write(BrexThrottle)
    # The statement depends on nothing else (its times are the database's), so it is
    # built through the ORM once per process and setting, not at every refresh.
    key = (alias, scope, window, limit)
    if key not in _budget_statements:
        rows = _rows(scope).using(alias).filter(
            window_started_at__gt=Now() - window, window_used__lt=limit
        )
        _budget_statements[key] = (
            update_sql(rows, {"window_used": F("window_used") + 1})
            # SQLite before 3.35: no RETURNING
            if connections[alias].features.can_return_columns_from_insert else None
        )
    return _budget_statements[key]


#: sweep_budget_sql()'s statements, by (database, scope, window, limit).
_budget_statements: dict[tuple, tuple[str, tuple] | None] = {}


def sweep_budget_use() -> tuple[int, int, int]:
    """(used, limit, refused) of the current window, for the sweep's log line."""
    limit = brex_settings.SWEEP_RATE_LIMIT
    row = (
        _rows(sweep_scope())
        .filter(window_started_at__gt=Now() - _window())
        .values_list("window_used", "window_refused")
        .first()
    )
    used, refused = row or (0, 0)
    return used, limit, refused
