"""Celery tasks: primary keys in, one service call each.

Add the beat entries of :data:`django_brex_oauth.beat.BEAT_SCHEDULE` (or your own) to
``CELERY_BEAT_SCHEDULE`` to run them periodically.
"""

from __future__ import annotations

import logging

from celery import shared_task

from .backoff import backoff_delay, not_before_delay
from .conf import brex_settings
from .exceptions import BrexUnavailable, RefreshPaused
from .services import (
    cleanup,
    connect,
    detached,
    health,
    lease,
    refresh,
    revoke,
    sweep,
    throttle,
    webhook_events,
    webhook_subscriptions,
)

logger = logging.getLogger("django_brex_oauth")

# --- Refresh (token refresh, sweep) -------------------------------------------------------


# acks_late + reject_on_worker_lost: a pool process killed mid-refresh (the OOM killer,
# say) puts its task back on the queue at once instead of losing it.
@shared_task(bind=True, ignore_result=True, acks_late=True, reject_on_worker_lost=True)
def refresh_connection(self, connection_id: int, force: bool = False) -> str:
    """Refresh one connection's tokens if they are due (at once with ``force``).

    Skips a connection another worker is refreshing. A transient failure (timeout, 429,
    5xx) is retried with exponential backoff and jitter, up to ``REFRESH_TASK_MAX_RETRIES``
    times (the next sweep picks the connection up again after that), never before Brex's
    ``Retry-After`` has passed; Brex refusing the refresh token marks the connection
    ``needs_reauth`` and is not retried. While refreshing is paused (Brex refused the
    client credentials) the task returns ``"paused"``: the sweep picks the connection up
    once they work. When the sweep's rate budget is used up, the task sends itself again
    for the next window and returns ``"deferred"``.

    A task that comes back because the worker running it died finds that worker's claim
    still held; it is sent again to run the moment the claim runs out, while Brex still
    accepts the refresh token the dead worker had sent (Brex's grace period for a
    rotated-out refresh token). Returns the
    :class:`~django_brex_oauth.services.refresh.Outcome` value.
    """
    try:
        result = refresh.refresh_connection(connection_id, force=force, wait=False, budget=True)
    except RefreshPaused:
        return "paused"
    except BrexUnavailable as err:
        max_retries = brex_settings.REFRESH_TASK_MAX_RETRIES
        if self.request.retries >= max_retries:
            raise
        countdown = backoff_delay(
            self.request.retries,
            base=brex_settings.REFRESH_RETRY_BACKOFF,
            cap=brex_settings.REFRESH_RETRY_BACKOFF_MAX,
        )
        countdown = not_before_delay(countdown, err.retry_after)
        raise self.retry(exc=err, countdown=countdown, max_retries=max_retries) from err
    if result.outcome == refresh.Outcome.DEFERRED:
        if not self.request.is_eager:
            window = brex_settings.SWEEP_RATE_WINDOW
            self.apply_async(
                (connection_id,), {"force": force},
                countdown=not_before_delay(0.0, max(0.5, result.retry_after or 0.0), spread=window),
            )
        return result.outcome.value
    if result.outcome == refresh.Outcome.BUSY and (self.request.delivery_info or {}).get(
        "redelivered"
    ):
        countdown = lease.claim_expires_in(connection_id) + 0.5
        self.apply_async((connection_id,), {"force": force}, countdown=countdown)
    return result.outcome.value


@shared_task(ignore_result=True)
def refresh_due_connections(all_active: bool = False) -> int:
    """The sweep: queue one :func:`refresh_connection` task per connection that is due.

    The due connection ids are read ``SWEEP_BATCH_SIZE`` at a time, one query per batch
    (:func:`~django_brex_oauth.services.sweep.batched_due_connection_ids`), and each batch is
    queued over one broker connection. ``all_active`` queues every active connection,
    forced. Beyond ``SWEEP_RATE_LIMIT`` tasks, each further ``SWEEP_RATE_LIMIT`` is sent for
    one ``SWEEP_RATE_WINDOW`` later, so that the shared budget rarely has to defer one.
    While a Brex asks to wait (``Retry-After``) or refuses the client credentials, nothing is
    queued for the connections made in its environment. Returns how many tasks were queued.
    """
    # Per Brex environment: a wait or a refused client at one Brex holds back only the
    # connections made there.
    held = sweep.held_environments()
    for environment, err in held.items():
        log = logger.error if isinstance(err, RefreshPaused) else logger.warning
        log("Refresh sweep: nothing queued: %s (for the connections made in %s)", err,
            environment)
    if len(held) == len(throttle.environments()):
        health.record_sweep(0, "Celery beat sweep, held back")
        return 0
    limit = brex_settings.SWEEP_RATE_LIMIT
    window = brex_settings.SWEEP_RATE_WINDOW
    queued = 0
    app = refresh_connection.app
    for batch in sweep.batched_due_connection_ids(
        all_active=all_active, exclude_environments=held
    ):
        if not batch:
            continue
        with app.producer_or_acquire() as producer:
            for connection_id in batch:
                countdown = (queued // limit) * window
                refresh_connection.apply_async(
                    (connection_id,), {"force": all_active}, producer=producer,
                    countdown=countdown or None,
                )
                queued += 1
    if queued:
        used, limit, refused = throttle.sweep_budget_use()
        logger.info(
            "Refresh sweep: queued %s refresh(es) over %s window(s) of %.0f s; rate budget: "
            "%s of %s token requests used in this window (%s deferred).",
            queued, (queued - 1) // limit + 1, window, used, limit, refused,
        )
    # For the admin's health page: when the sweep last ran.
    health.record_sweep(queued, "Celery beat sweep")
    return queued


# --- Identity (read again after connecting) ------------------------------------------------


@shared_task(ignore_result=True)
def read_identity(connection_id: int) -> bool:
    """Read who connected (email, company) again, for a connection whose identity Brex did
    not answer in a usable form when it connected. The API client retries 429, 5xx and
    network errors itself; what still fails is left for the next reconnect. Returns True
    once the identity is complete."""
    return connect.update_identity(connection_id)


# --- Revocation and cleanup ---------------------------------------------------------------


@shared_task(bind=True, ignore_result=True)
def revoke_connection(self, connection_id: int) -> str:
    """Ask Brex again to revoke a disconnected connection whose revocation is pending.

    While Brex cannot be reached (timeout, 429, 5xx) the task retries with exponential
    backoff and jitter, never before Brex's ``Retry-After`` has passed, up to
    ``REVOKE_TASK_MAX_RETRIES`` times; after that, or when Brex refuses the request, the
    revocation stays pending for :func:`sweep_revocations`. Each try is recorded as an
    event. Returns the
    :class:`~django_brex_oauth.services.revoke.RevokeOutcome` value.
    """
    attempt = revoke.revoke_at_brex(connection_id)
    _retry_revocation_while_unavailable(self, attempt)
    return attempt.outcome.value


@shared_task(bind=True, ignore_result=True)
def revoke_detached_token(self, revocation_id: int) -> str:
    """Ask Brex to revoke the token of a deleted connection (a
    :class:`~django_brex_oauth.models.DetachedRevocation`), with the retries of
    :func:`revoke_connection`; what they do not settle is left to
    :func:`sweep_revocations`. Returns the
    :class:`~django_brex_oauth.services.revoke.RevokeOutcome` value.
    """
    attempt = detached.revoke_detached(revocation_id)
    _retry_revocation_while_unavailable(self, attempt)
    return attempt.outcome.value


def _retry_revocation_while_unavailable(task, attempt) -> None:
    """Retry ``task`` with backoff and jitter while Brex cannot be reached, up to
    ``REVOKE_TASK_MAX_RETRIES`` times, never before Brex's ``Retry-After`` has passed."""
    max_retries = brex_settings.REVOKE_TASK_MAX_RETRIES
    if attempt.retryable and task.request.retries < max_retries:
        countdown = backoff_delay(
            task.request.retries + 1,
            base=brex_settings.REVOKE_RETRY_BACKOFF,
            cap=brex_settings.REVOKE_RETRY_BACKOFF_MAX,
        )
        countdown = not_before_delay(countdown, attempt.retry_after)
        raise task.retry(countdown=countdown, max_retries=max_retries)


@shared_task(ignore_result=True)
def sweep_revocations() -> int:
    """Queue :func:`revoke_connection` for every revocation still pending, and
    :func:`revoke_detached_token` for every deleted connection's token still to revoke,
    that nothing has tried for ``REVOKE_RETRY_BACKOFF_MAX`` seconds (a lost or exhausted
    task, say). Returns how many tasks were queued."""
    queued = 0
    app = revoke_connection.app
    with app.producer_or_acquire() as producer:
        for connection_id in revoke.pending_revocation_ids():
            revoke_connection.apply_async((connection_id,), producer=producer)
            queued += 1
        for revocation_id in detached.pending_detached_ids():
            revoke_detached_token.apply_async((revocation_id,), producer=producer)
            queued += 1
    return queued


@shared_task(ignore_result=True)
def prune() -> dict[str, int]:
    """Delete expired authorization requests and events past their retention
    (``EVENT_RETENTION_DAYS``; ``REFRESH_EVENT_RETENTION_DAYS`` for refresh events).
    Returns how many rows of each were deleted."""
    return cleanup.prune().as_dict()


# --- Webhooks -----------------------------------------------------------------------------


# acks_late: a worker killed mid-way puts the event back; the claim in process() keeps a
# redelivered task from running the handlers a second time.
@shared_task(name="brex_oauth.process_webhook_event", ignore_result=True, acks_late=True)
def process_webhook_event(event_id: int) -> str:
    """Run the handlers of a stored webhook event once (``WEBHOOK_PROCESS_IN_TASK``).
    Returns the event's status afterwards, or ``"skipped"`` when it was not claimable."""
    event = webhook_events.process(event_id)
    return event.status if event is not None else "skipped"


@shared_task(name="brex_oauth.sync_webhook_subscription", ignore_result=True)
def sync_webhook_subscription(subscription_id: int, retries: int = 0) -> str:
    """Try again to create or delete a webhook subscription at Brex. While Brex cannot be
    reached it is queued again with backoff, up to ``WEBHOOK_TASK_MAX_RETRIES`` times;
    ``manage.py brex_oauth_webhooks --sync`` picks up what is left. Returns the
    subscription's status afterwards."""
    result = webhook_subscriptions.attempt(subscription_id)
    if result is None:
        return "missing"
    if result.retryable and retries < brex_settings.WEBHOOK_TASK_MAX_RETRIES:
        webhook_subscriptions.queue_retry(subscription_id, retries + 1)
    return result.subscription.status
