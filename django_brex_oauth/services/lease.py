"""The refresh claim: a lease on a connection's token row, so that only one worker (thread,
process or host) refreshes a connection at a time, with nothing but the database.

A worker *claims* the connection with a conditional ``UPDATE`` (``refresh_claimed_until``
is empty or in the past, by the database's clock), which exactly one contender wins: the
winner refreshes and saves, which releases the claim; a loser either waits and then uses
the winner's tokens (on demand) or skips (the sweep). A worker killed in the middle leaves
a claim that simply expires after ``REFRESH_LEASE_SECONDS``.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from datetime import timedelta

from django.db.models import F, Q
from django.db.models.functions import Now

from ..conf import brex_settings
from ..models import BrexToken


def lease_seconds() -> float:
    """How long a claim lasts: ``REFRESH_LEASE_SECONDS``, but always past the HTTP timeout."""
    return max(brex_settings.REFRESH_LEASE_SECONDS, brex_settings.HTTP_TIMEOUT + 5)


def new_claimant_id() -> str:
    """An id for one refresh attempt: host, process, thread and a random part (64 chars max)."""
    host = socket.gethostname()[:30]
    return f"{host}:{os.getpid()}:{threading.get_ident() % 1_000_000}:{uuid.uuid4().hex[:8]}"[:64]


def unclaimed() -> Q:
    """The condition of a token row no worker holds: no claim, or one that ran out."""
    return Q(refresh_claimed_until__isnull=True) | Q(refresh_claimed_until__lt=Now())


def claim(connection_id: int, claimant: str) -> bool:
    """Try to take the refresh claim of a connection; True when this caller won it.

    One conditional ``UPDATE``: PostgreSQL re-checks the condition after waiting for a
    concurrent writer's row lock, and SQLite serialises writers, so exactly one contender
    gets a row count of 1. Times come from the database, so hosts' clocks do not matter.
    """
    lease = timedelta(seconds=lease_seconds())
    taken = (
        BrexToken.objects.filter(pk=connection_id)
        .filter(unclaimed())
        .update(refresh_claimed_until=Now() + lease, refresh_claimed_by=claimant)
    )
    return taken == 1


def renew_claim(connection_id: int, claimant: str) -> bool:
    """Extend a claim this caller holds by a full lease; False when it was lost."""
    lease = timedelta(seconds=lease_seconds())
    renewed = BrexToken.objects.filter(pk=connection_id, refresh_claimed_by=claimant).update(
        refresh_claimed_until=Now() + lease
    )
    return renewed == 1


def claim_expires_in(connection_id: int) -> float:
    """Seconds until the current claim on a connection runs out (0 when there is none),
    by the database's clock, at most one lease."""
    remaining = (
        BrexToken.objects.filter(pk=connection_id, refresh_claimed_until__isnull=False)
        .annotate(left=F("refresh_claimed_until") - Now())
        .values_list("left", flat=True)
        .first()
    )
    if remaining is None:
        return 0.0
    return min(max(0.0, remaining.total_seconds()), lease_seconds())


def release_claim(connection_id: int, claimant: str) -> None:
    """Give up a claim if this caller still holds it."""
    BrexToken.objects.filter(pk=connection_id, refresh_claimed_by=claimant).update(
        refresh_claimed_until=None, refresh_claimed_by=""
    )
