"""How every connection stands, at a glance: the figures of the admin's health page.

:func:`snapshot` reads them in a fixed number of queries whatever the number of
connections (counts and aggregates in the database, short lists cut to
:data:`LIST_LENGTH`), so the page costs the same at twenty connections or a million.

It also keeps the one thing nothing else records: when the refresh sweep last ran
(:func:`record_sweep`, called by the Celery sweep and by ``manage.py brex_oauth_refresh``).
That is one row of :class:`~django_brex_oauth.models.BrexThrottle` (scope
``sweep-run``), the table every process on every host already shares, updated once a
run: the Django cache could be per process, and then the web process would never see what
a worker did.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from django.db.models import Count, F, Min
from django.db.models.functions import Now, TruncDate
from django.utils import timezone

from ..conf import brex_settings
from ..models import (
    BrexConnection,
    BrexThrottle,
    BrexToken,
    ConnectionEvent,
    ConnectionStatus,
    DetachedRevocation,
    EventKind,
    RevocationStatus,
)

#: Rows in each list of the page (oldest refresh tokens, pending revocations).
LIST_LENGTH = 10

#: Days of refreshes and failures the chart shows, today included.
CHART_DAYS = 30

#: The BrexThrottle scope that records the last sweep.
SWEEP_SCOPE = "sweep-run"

#: The events counted as a failed refresh: a transient failure (retried) and Brex
#: refusing the refresh token (the customer must connect again).
FAILURE_KINDS = (EventKind.REFRESH_FAILED, EventKind.NEEDS_REAUTH)


# The sweep's record ------------------------------------------------------------------------


def record_sweep(queued: int, how: str) -> None:
    """Record that a sweep ran just now (the database's time), queuing or refreshing
    ``queued`` connections; ``how`` says which sweep (log-safe, shown to staff). One
    ``UPDATE``; the row is made the first time."""
    changes = {"since": Now(), "window_used": max(0, int(queued)), "detail": how[:200]}
    rows = BrexThrottle.objects.filter(scope=SWEEP_SCOPE)
    if not rows.update(**changes):
        BrexThrottle.objects.get_or_create(scope=SWEEP_SCOPE)
        rows.update(**changes)


@dataclass(frozen=True)
class SweepRun:
    """The last sweep: when it ran, how many connections it took on, and which it was."""

    ran_at: dt.datetime
    connections: int
    how: str


def last_sweep() -> SweepRun | None:
    """The last sweep recorded, or None when none ran since the app was installed."""
    row = (
        BrexThrottle.objects.filter(scope=SWEEP_SCOPE, since__isnull=False)
        .values_list("since", "window_used", "detail")
        .first()
    )
    if row is None:
        return None
    ran_at, connections, how = row
    assert ran_at is not None  # filtered above
    return SweepRun(ran_at, connections, how)


# The snapshot ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DayCount:
    """Refreshes and failures of one day (in the current time zone)."""

    day: dt.date
    refreshed: int = 0
    failed: int = 0
    needs_reauth: int = 0


@dataclass(frozen=True)
class AgingRefreshToken:
    """An active connection and the app's reckoning of its refresh token: the last
    rotation (last received from or sent to Brex) and the estimated end
    (``REFRESH_TOKEN_LIFETIME`` later; Brex does not say)."""

    connection: BrexConnection
    last_rotated: dt.datetime | None
    ends_at: dt.datetime
    days_left: int


@dataclass(frozen=True)
class PendingRevocation:
    """A revocation Brex has not confirmed: a revoked connection's (``connection_id``) or
    a deleted connection's (``former_connection_id``, a DetachedRevocation)."""

    label: str
    environment: str
    since: dt.datetime | None
    attempts: int
    attempted_at: dt.datetime | None
    last_error: str
    connection_id: int | None = None
    former_connection_id: int | None = None


@dataclass
class Snapshot:
    """Everything the health page shows, read at ``now``."""

    now: dt.datetime
    #: Connections per status value, every status present (0 when none).
    by_status: dict[str, int]
    #: Revoked connections per revocation status value (pending, done, not_possible, "").
    revoked_by_revocation: dict[str, int]
    #: One entry per day of the last :data:`CHART_DAYS`, oldest first.
    days: list[DayCount]
    #: Active connections whose refresh token has gone longest without a rotation.
    oldest_refresh_tokens: list[AgingRefreshToken]
    #: Revoked connections whose revocation Brex has not confirmed, oldest first.
    pending_revocations: list[PendingRevocation]
    #: Tokens of deleted connections still to revoke, oldest first, and how many in all.
    detached_revocations: list[PendingRevocation]
    detached_total: int
    last_sweep: SweepRun | None
    #: When the most overdue connection became due for a refresh (None: none is active).
    oldest_due_since: dt.datetime | None
    #: REFRESH_EVENT_RETENTION_DAYS when it is shorter than the chart (older days are empty).
    refresh_events_kept_days: int | None = None

    @property
    def total(self) -> int:
        return sum(self.by_status.values())

    @property
    def pending_total(self) -> int:
        return self.revoked_by_revocation.get(RevocationStatus.PENDING, 0)

    @property
    def not_possible_total(self) -> int:
        return self.revoked_by_revocation.get(RevocationStatus.NOT_POSSIBLE, 0)

    @property
    def since_last_sweep(self) -> dt.timedelta | None:
        if self.last_sweep is None:
            return None
        return max(dt.timedelta(0), self.now - self.last_sweep.ran_at)

    @property
    def lag(self) -> dt.timedelta:
        """How long the most overdue connection has waited for its refresh since it became
        due (zero when none is overdue): how far the refreshing is behind."""
        if self.oldest_due_since is None:
            return dt.timedelta(0)
        return max(dt.timedelta(0), self.now - self.oldest_due_since)

    @property
    def refreshes(self) -> int:
        return sum(day.refreshed for day in self.days)

    @property
    def failures(self) -> int:
        return sum(day.failed for day in self.days)


def snapshot(now: dt.datetime | None = None) -> Snapshot:
    """Read every figure of the health page: eight queries, whatever the number of
    connections."""
    now = now or timezone.now()
    by_status, revoked = _counts()
    detached, detached_total = _detached_revocations()
    return Snapshot(
        now=now,
        by_status=by_status,
        revoked_by_revocation=revoked,
        days=_days(now),
        oldest_refresh_tokens=_oldest_refresh_tokens(now),
        pending_revocations=_pending_revocations(),
        detached_revocations=detached,
        detached_total=detached_total,
        last_sweep=last_sweep(),
        oldest_due_since=_oldest_due_since(),
        refresh_events_kept_days=_refresh_events_kept_days(),
    )


def _counts() -> tuple[dict[str, int], dict[str, int]]:
    """Connections per status, and revoked ones per revocation status: one query."""
    by_status = {value: 0 for value in ConnectionStatus.values}
    revoked: dict[str, int] = {}
    rows = (
        BrexConnection.objects.order_by()
        .values_list("status", "revocation_status")
        .annotate(n=Count("pk"))
    )
    for status, revocation_status, count in rows:
        by_status[status] = by_status.get(status, 0) + count
        if status == ConnectionStatus.REVOKED:
            revoked[revocation_status] = revoked.get(revocation_status, 0) + count
    return by_status, revoked


def _days(now: dt.datetime) -> list[DayCount]:
    """Refreshes and failures per local day over the last :data:`CHART_DAYS`: one query."""
    zone = timezone.get_current_timezone()
    today = timezone.localtime(now, zone).date()
    first = today - dt.timedelta(days=CHART_DAYS - 1)
    start = dt.datetime.combine(first, dt.time.min, tzinfo=zone)
    kinds = (EventKind.REFRESHED, *FAILURE_KINDS)
    rows = (
        ConnectionEvent.objects.order_by()
        .filter(created_at__gte=start, kind__in=kinds)
        .annotate(day=TruncDate("created_at", tzinfo=zone))
        .values_list("day", "kind")
        .annotate(n=Count("pk"))
    )
    counts: dict[dt.date, dict[str, int]] = {}
    for day, kind, count in rows:
        counts.setdefault(day, {})[kind] = count
    result = []
    for offset in range(CHART_DAYS):
        day = first + dt.timedelta(days=offset)
        kinds_of_day = counts.get(day, {})
        result.append(DayCount(
            day=day,
            refreshed=kinds_of_day.get(EventKind.REFRESHED, 0),
            failed=sum(kinds_of_day.get(kind, 0) for kind in FAILURE_KINDS),
            needs_reauth=kinds_of_day.get(EventKind.NEEDS_REAUTH, 0),
        ))
    return result


def _oldest_refresh_tokens(now: dt.datetime) -> list[AgingRefreshToken]:
    """Active connections whose refresh token ends soonest (by the app's estimate): one
    query, no token value read."""
    rows = (
        BrexConnection.objects.filter(
            status=ConnectionStatus.ACTIVE, token__refresh_token_expires_at__isnull=False
        )
        .select_related("owner")
        .annotate(
            ends_at=F("token__refresh_token_expires_at"),
            last_rotated=F("token__refresh_token_used_at"),
        )
        .order_by("ends_at", "pk")[:LIST_LENGTH]
    )
    return [
        AgingRefreshToken(
            connection=row,
            last_rotated=row.last_rotated,
            ends_at=row.ends_at,
            days_left=max(0, (row.ends_at - now).days),
        )
        for row in rows
    ]


def _pending_revocations() -> list[PendingRevocation]:
    """Revoked connections whose revocation Brex has not confirmed yet: one query."""
    rows = BrexConnection.objects.filter(
        status=ConnectionStatus.REVOKED, revocation_status=RevocationStatus.PENDING
    ).order_by("revoked_at", "pk")[:LIST_LENGTH]
    return [
        PendingRevocation(
            label=row.display_name or row.brex_user_id,
            environment=row.get_environment_display(),
            since=row.revoked_at,
            attempts=row.revocation_attempts,
            attempted_at=row.revocation_attempted_at,
            last_error=row.last_error,
            connection_id=row.pk,
        )
        for row in rows
    ]


def _detached_revocations() -> tuple[list[PendingRevocation], int]:
    """Tokens of deleted connections still to revoke (never their value), and how many:
    two queries."""
    rows = list(
        DetachedRevocation.objects.order_by("created_at", "pk").values_list(
            "former_connection_id", "brex_user_id", "environment", "created_at", "attempts",
            "attempted_at", "last_error",
        )[:LIST_LENGTH]
    )
    total = DetachedRevocation.objects.count()
    labels = dict(BrexConnection._meta.get_field("environment").flatchoices)
    return [
        PendingRevocation(
            label=brex_user_id or f"#{former_id}",
            environment=str(labels.get(environment, environment)),
            since=created_at,
            attempts=attempts,
            attempted_at=attempted_at,
            last_error=last_error,
            former_connection_id=former_id,
        )
        for former_id, brex_user_id, environment, created_at, attempts, attempted_at, last_error
        in rows
    ], total


def _oldest_due_since() -> dt.datetime | None:
    """When the connection that has waited longest became due for a refresh: the earliest
    access token expiry less ``REFRESH_MARGIN``, or the longest-idle refresh token plus
    ``REFRESH_TOKEN_REFRESH_AGE``. One query over the sweep's two partial indexes (only
    active connections have an access token expiry)."""
    row = BrexToken.objects.filter(access_token_expires_at__isnull=False).aggregate(
        expires=Min("access_token_expires_at"), used=Min("refresh_token_used_at")
    )
    candidates = []
    if row["expires"] is not None:
        candidates.append(row["expires"] - dt.timedelta(seconds=brex_settings.REFRESH_MARGIN))
    if row["used"] is not None:
        candidates.append(
            row["used"] + dt.timedelta(seconds=brex_settings.REFRESH_TOKEN_REFRESH_AGE)
        )
    return min(candidates, default=None)


def _refresh_events_kept_days() -> int | None:
    """REFRESH_EVENT_RETENTION_DAYS when the prune task keeps refresh events for fewer
    days than the chart shows, else None."""
    kept = brex_settings.REFRESH_EVENT_RETENTION_DAYS
    return int(kept) if kept is not None and int(kept) < CHART_DAYS else None


__all__ = [
    "AgingRefreshToken",
    "CHART_DAYS",
    "LIST_LENGTH",
    "DayCount",
    "PendingRevocation",
    "Snapshot",
    "SweepRun",
    "last_sweep",
    "record_sweep",
    "snapshot",
]
