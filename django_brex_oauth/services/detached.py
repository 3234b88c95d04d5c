"""Revoking the grant of a connection that is deleted rather than disconnected.

A connection that is deleted (its owner deleted, a queryset or the admin deleting it) takes
its events with it, but not its grant at Brex: just before the rows go, its token is
copied, encrypted, into a :class:`~django_brex_oauth.models.DetachedRevocation`, which the
``revoke_detached_token`` task and the revocation sweep revoke with the same retries as a
disconnect.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Q
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from .. import oauth
from ..conf import brex_settings
from ..db import write_transaction
from ..exceptions import BrexOAuthError, BrexUnavailable
from ..fields import UndecryptableValue
from ..models import BrexConnection, BrexToken, DetachedRevocation
from . import throttle
from .revoke import (
    RevocationAttempt,
    RevokeOutcome,
    is_retryable,
    pending_revocation_ids,
    queue_after_commit,
    revoke_at_brex,
    token_to_revoke,
    wait_for_brex,
)

logger = logging.getLogger("django_brex_oauth")


@sensitive_variables()
def detach_before_delete(connection: BrexConnection, *, using: str | None = None) -> None:
    """Keep what is needed to revoke ``connection`` at Brex once its rows are deleted.

    Connected to ``pre_delete`` of :class:`~django_brex_oauth.models.BrexConnection`, so it
    runs for every way a connection is deleted (one row, a queryset, the admin, a cascade
    from its owner), inside the deleting transaction and before any row goes: the refresh
    token (or the access token, when only that is left) is copied, encrypted, into a
    :class:`~django_brex_oauth.models.DetachedRevocation`, and the ``revoke_detached_token``
    task is queued after the commit. A deletion that rolls back leaves nothing behind. A
    connection whose tokens were already wiped (revoked and confirmed) needs nothing. A token
    that no configured key can decrypt cannot be revoked; the deletion goes on and a warning
    says so.
    """
    tokens = BrexToken.objects.using(using).filter(pk=connection.pk)
    try:
        token = tokens.only("connection_id", "access_token", "refresh_token").first()
    except UndecryptableValue:
        logger.warning(
            "Brex connection %s was deleted with tokens no configured key can decrypt; they "
            "could not be revoked at Brex.", connection.pk,
        )
        return
    value, hint = token_to_revoke(token)
    if value is None:
        return
    revocation = DetachedRevocation.objects.using(using).create(
        token=value,
        token_type_hint=hint,
        environment=connection.environment,
        former_connection_id=connection.pk,
        brex_user_id=connection.brex_user_id,
    )
    logger.info(
        "Brex connection %s is being deleted; its %s will be revoked at Brex (revocation %s).",
        connection.pk, hint.replace("_", " "), revocation.pk,
    )
    queue_after_commit(
        "revoke_detached_token", revocation.pk, 0,
        f"deleted Brex connection {connection.pk}", using=using,
    )


def revoke_when_deleted(sender, instance: BrexConnection, using: str | None = None,
                        **kwargs) -> None:
    """The ``pre_delete`` receiver for connections: :func:`detach_before_delete`."""
    detach_before_delete(instance, using=using)


@sensitive_variables()
def revoke_detached(revocation: DetachedRevocation | int) -> RevocationAttempt:
    """Ask Brex once to revoke the token of a deleted connection.

    On success (or when the revocation is gone: another worker finished it) the
    :class:`~django_brex_oauth.models.DetachedRevocation` is deleted; on failure its
    ``attempts``, ``attempted_at`` and ``last_error`` say why and the token is kept
    (encrypted) for the next try. The returned attempt's ``connection_id`` is the id the
    deleted connection had.
    """
    revocation_id = int(
        revocation.pk if isinstance(revocation, DetachedRevocation) else revocation
    )
    waiting = wait_for_brex(0)
    if waiting is not None:
        return waiting
    with write_transaction():
        locked = (
            DetachedRevocation.objects.select_for_update().filter(pk=revocation_id).first()
        )
        if locked is None:
            return RevocationAttempt(RevokeOutcome.NOT_PENDING, 0)
        locked.attempts += 1
        locked.attempted_at = timezone.now()
        locked.save(update_fields=["attempts", "attempted_at"])
    former = int(locked.former_connection_id)
    try:
        oauth.revoke(locked.token, locked.token_type_hint,
                     issuer=brex_settings.issuer_for(locked.environment))
    except BrexOAuthError as err:
        retryable = is_retryable(err)
        retry_after = err.retry_after if isinstance(err, BrexUnavailable) else None
        if isinstance(err, BrexUnavailable):
            throttle.hold_for(throttle.revocation_scope(), err)
        error = str(err)[:1000]
        DetachedRevocation.objects.filter(pk=revocation_id).update(
            last_error=f"Revocation at Brex failed (attempt {locked.attempts}): {error}"
        )
        logger.warning(
            "Revoking the token of deleted Brex connection %s failed (attempt %s): %s",
            former, locked.attempts, error,
        )
        return RevocationAttempt(RevokeOutcome.FAILED, former, locked.attempts, error,
                                 retryable, retry_after)
    DetachedRevocation.objects.filter(pk=revocation_id).delete()
    logger.info(
        "Revoked the %s of deleted Brex connection %s at Brex (attempt %s).",
        locked.token_type_hint.replace("_", " "), former, locked.attempts,
    )
    return RevocationAttempt(RevokeOutcome.REVOKED, former, locked.attempts)


def pending_detached_ids(now: datetime | None = None) -> Iterator[int]:
    """Ids of detached revocations that nothing has tried for ``REVOKE_RETRY_BACKOFF_MAX``
    seconds (a task retrying one is left alone), as :func:`pending_revocation_ids`."""
    if throttle.wait_left(throttle.revocation_scope()) > 0:
        return iter(())
    now = now or timezone.now()
    quiet_since = now - timedelta(seconds=brex_settings.REVOKE_RETRY_BACKOFF_MAX)
    return (
        DetachedRevocation.objects.filter(
            Q(attempted_at__isnull=True) | Q(attempted_at__lte=quiet_since)
        )
        .order_by("attempted_at", "pk")
        .values_list("pk", flat=True)
        .iterator(chunk_size=500)
    )


@dataclass
class RevocationReport:
    """Counts of what :func:`retry_pending_revocations` did."""

    revoked: int = 0
    failed: int = 0
    skipped: int = 0

    @property
    def total(self) -> int:
        return self.revoked + self.failed + self.skipped


def retry_pending_revocations(now: datetime | None = None) -> RevocationReport:
    """Try once more, in this process, every revocation the sweep would pick up (for cron)."""
    report = RevocationReport()
    attempts = [revoke_at_brex(pk) for pk in list(pending_revocation_ids(now))]
    attempts += [revoke_detached(pk) for pk in list(pending_detached_ids(now))]
    for attempt in attempts:
        if attempt.outcome == RevokeOutcome.REVOKED:
            report.revoked += 1
        elif attempt.outcome == RevokeOutcome.FAILED:
            report.failed += 1
        else:
            report.skipped += 1
    return report
