"""Refreshing a connection's tokens: on demand, from the sweep, safely across workers.

Only one refresh of a connection runs at a time, across threads, processes and hosts,
with nothing but the database: a worker first *claims* the connection with a conditional
``UPDATE`` (``refresh_claimed_until`` is empty or in the past, by the database's clock),
which exactly one contender wins. The winner refreshes and saves; a loser either waits and
then uses the winner's tokens (on demand) or skips (the sweep). A worker killed in the
middle leaves a claim that simply expires after ``REFRESH_LEASE_SECONDS``.

Call these functions outside a database transaction: a claim and a rotated refresh token
must be committed at once, not when some outer transaction decides to commit (or roll back
and lose the only refresh token Brex still accepts).
"""

from __future__ import annotations

import enum
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from django.contrib.messages import constants as levels
from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext
from django.views.decorators.debug import sensitive_variables

from .. import discovery, oauth, signals
from ..backoff import jittered_waits
from ..conf import brex_settings
from ..db import write_transaction
from ..exceptions import (
    BrexOAuthError,
    BrexUnavailable,
    DiscoveryError,
    InvalidClient,
    InvalidGrant,
    MalformedTokenResponse,
    RefreshPaused,
    TokenError,
)
from ..fields import UndecryptableValue
from ..models import (
    BrexConnection,
    BrexToken,
    ConnectionEvent,
    ConnectionStatus,
    EventKind,
    connection_pk,
    due_condition,
    team_note,
    with_team_note,
)
from . import lease, refresh_save, throttle, unreadable

logger = logging.getLogger("django_brex_oauth")

#: How many times a refused refresh token is swapped for one another worker stored meanwhile.
_MAX_TOKEN_SWAPS = 3


class Outcome(str, enum.Enum):
    """What :func:`refresh_connection` did."""

    #: Brex issued new tokens and they are saved.
    REFRESHED = "refreshed"
    #: Nothing to do: the tokens are fresh (perhaps another worker just refreshed them).
    NOT_DUE = "not_due"
    #: Another worker holds the claim (only when ``wait=False``).
    BUSY = "busy"
    #: Brex refused the refresh token: the connection now needs the customer to reconnect.
    NEEDS_REAUTH = "needs_reauth"
    #: The connection was not active (revoked, or needing re-authorization already).
    NOT_ACTIVE = "not_active"
    #: The sweep's rate budget is used up for this window (only with ``budget=True``):
    #: nothing was sent; try again after ``retry_after`` seconds.
    DEFERRED = "deferred"


@dataclass(frozen=True)
class RefreshResult:
    """The outcome of one refresh attempt and the tokens as they now stand."""

    outcome: Outcome
    connection_id: int
    token: BrexToken | None = None
    rotated: bool = False
    #: For ``DEFERRED``: seconds until the sweep's budget has room again.
    retry_after: float | None = None

    @property
    def usable(self) -> bool:
        """True when ``token`` holds an access token the connection may use."""
        return (
            self.outcome in (Outcome.REFRESHED, Outcome.NOT_DUE)
            and self.token is not None
            and bool(self.token.access_token)
        )

    def staff_message(
        self, label: str, connection: BrexConnection, when: Callable[[datetime | None], str]
    ) -> tuple[int, str]:
        """What staff are told in the admin about refreshing ``connection`` (named
        ``label``; ``when`` formats a time): a ``django.contrib.messages`` level and the
        text."""
        if self.outcome == Outcome.REFRESHED:
            expires = self.token.access_token_expires_at if self.token else None
            text = (
                gettext(
                    "%(label)s: refreshed; the access token is valid until %(when)s, "
                    "the refresh token was rotated."
                )
                if self.rotated
                else gettext(
                    "%(label)s: refreshed; the access token is valid until %(when)s, "
                    "the refresh token was kept."
                )
            )
            return levels.SUCCESS, text % {"label": label, "when": when(expires)}
        if self.outcome == Outcome.NEEDS_REAUTH:
            return levels.ERROR, gettext(
                "%(label)s: Brex refused the refresh token; the customer must "
                "connect again."
            ) % {"label": label}
        if self.outcome == Outcome.BUSY:
            return levels.INFO, gettext(
                "%(label)s: another worker is refreshing it right now."
            ) % {"label": label}
        if self.outcome == Outcome.NOT_DUE:
            return levels.INFO, gettext(
                "%(label)s: was refreshed by another worker just now."
            ) % {"label": label}
        connection.refresh_from_db(fields=["status"])
        return levels.WARNING, gettext(
            '%(label)s: not refreshed; its status is "%(status)s".'
        ) % {"label": label, "status": connection.get_status_display()}


# Refreshing one connection ----------------------------------------------------------------


_load = lease.load


@sensitive_variables()
def refresh_connection(
    connection: BrexConnection | int,
    *,
    force: bool = False,
    wait: bool = True,
    min_validity: float | None = None,
    stale_access_token: str | None = None,
    budget: bool = False,
) -> RefreshResult:
    """Refresh a connection's tokens if they need it, unless another worker is already on it.

    What "need it" means:

    * ``stale_access_token``: Brex rejected this access token (a 401), so refresh unless the
      stored one has changed since;
    * ``force``: refresh now, unless another worker refreshes while this one waits;
    * ``min_validity``: the access token expires within that many seconds;
    * otherwise the sweep's rule (:meth:`BrexToken.is_due_for_refresh`).

    With ``wait`` (on demand), a caller that loses the race for the claim waits for the
    winner and returns its tokens (``NOT_DUE``), or takes over once a dead winner's claim
    expires. Without it (the sweep), it returns ``BUSY`` at once.

    Every caller honours the waits of :mod:`.throttle`, shared by every process: while
    Brex's ``Retry-After`` runs nothing is sent (an on-demand caller sleeps through up to
    ``RETRY_BACKOFF_MAX`` seconds of it; a longer wait raises :class:`BrexUnavailable` with
    ``retry_after``), and while Brex refuses the client credentials :class:`RefreshPaused`
    is raised. With ``budget`` (the sweep), the request is taken from the sweep's shared
    rate budget first, and ``DEFERRED`` returned when it is used up.

    Raises :class:`BrexUnavailable` for a transient failure (timeout, connection error, 429,
    5xx, discovery unreachable): tokens untouched, connection still active, the failure
    recorded. Brex refusing the refresh token is not raised: the connection is marked
    ``needs_reauth`` and ``NEEDS_REAUTH`` returned; so is a connection whose tokens no
    configured key can decrypt (see :mod:`~django_brex_oauth.services.unreadable`).
    Brex refusing the site's client credentials (``invalid_client``) leaves the connection
    active and its tokens untouched, pauses refreshing for every connection and raises
    :class:`RefreshPaused`.
    """
    connection_id = connection_pk(connection)
    claimant = ""  # the one id this call's claims are taken under, made when first needed
    if not wait and stale_access_token is None and min_validity is None:
        # The sweep and its tasks: the connection is most likely due, so claim it and read
        # it in one go; anything unusual goes the long way below, which finds out why.
        claimant = lease.new_claimant_id()
        done = _claim_at_once(connection_id, claimant, force=force, budget=budget)
        if done is not None:
            return done
    try:
        token = _load(connection_id)
    except UndecryptableValue:
        # No configured key decrypts its tokens: out of use until the customer reconnects.
        marked = unreadable.mark_unreadable(connection_id)
        return RefreshResult(Outcome.NEEDS_REAUTH if marked else Outcome.NOT_ACTIVE,
                             connection_id)
    if not _active(token):
        if token is not None and token.access_token_expires_at is not None:
            _forget_access_token(connection_id)
        return RefreshResult(Outcome.NOT_ACTIVE, connection_id, token)
    assert token is not None  # for mypy: _active() said so
    if force and stale_access_token is None:
        stale_access_token = token.access_token or ""
    need = _Need(stale_access_token, min_validity)
    if need(token):
        # Outside the claim: an on-demand caller may sleep through a short Retry-After.
        throttle.before_token_request(
            max_wait=brex_settings.RETRY_BACKOFF_MAX if wait else 0.0,
            environment=token.connection.environment,
        )
    claimant = claimant or lease.new_claimant_id()
    claimed = _take_claim(connection_id, claimant, token, need, wait)
    if isinstance(claimed, RefreshResult):
        return claimed
    return _refresh_under_claim(claimed, claimant, need, budget=budget)


def _claim_at_once(
    connection_id: int, claimant: str, *, force: bool, budget: bool
) -> RefreshResult | None:
    """Claim a connection the sweep found due (any active one with ``force``) and read it
    in one statement, taking the request from the sweep's budget with it (in the same
    statement on PostgreSQL), then refresh it; None when it was not claimed that way."""
    condition = None if force else due_condition(timezone.now())
    budget_sql = throttle.sweep_budget_sql() if budget else None
    try:
        token, budget_taken = lease.claim_and_load_then(
            connection_id, claimant, condition, budget_sql
        )
    except UndecryptableValue:
        lease.release_claim(connection_id, claimant)
        return None
    if token is None:
        return None
    need = _Need(token.access_token or "") if force else _Need()
    try:
        throttle.before_token_request(environment=token.connection.environment)
    except Exception:
        lease.release_claim(connection_id, claimant)
        raise
    return _refresh_under_claim(token, claimant, need, budget=budget and not budget_taken)


@dataclass(frozen=True)
class _Need:
    """Whether a connection's tokens need a refresh, for one caller:

    * ``stale_access_token``: Brex rejected it, so refresh unless the stored one changed;
    * ``min_validity``: the access token expires within that many seconds;
    * neither: the sweep's rule (:meth:`BrexToken.is_due_for_refresh`).
    """

    stale_access_token: str | None = None
    min_validity: float | None = None

    def __call__(self, current: BrexToken) -> bool:
        if not current.refresh_token:
            return False
        if self.stale_access_token is not None:
            return not current.access_token or current.access_token == self.stale_access_token
        if self.min_validity is not None:
            return current.access_token_expires_within(self.min_validity)
        return current.is_due_for_refresh()


def _active(token: BrexToken | None) -> bool:
    return token is not None and token.connection.status == ConnectionStatus.ACTIVE


def _settled(connection_id: int, token: BrexToken | None, need: _Need) -> RefreshResult | None:
    """The result when there is nothing (more) to do for this connection, else None."""
    if not _active(token):
        return RefreshResult(Outcome.NOT_ACTIVE, connection_id, token)
    assert token is not None
    if not need(token):
        return RefreshResult(Outcome.NOT_DUE, connection_id, token)
    return None


def _take_claim(
    connection_id: int, claimant: str, token: BrexToken | None, need: _Need, wait: bool
) -> BrexToken | RefreshResult:
    """Take the claim and read the tokens under it, or the result when there is nothing
    to do: the tokens need no refresh (any more), or another worker holds the claim and
    ``wait`` is off. With ``wait``, a caller that loses the race waits for the winner (and
    then finds its tokens) or for a dead winner's claim to run out."""
    looks = itertools.chain([0], jittered_waits(first=0.05, cap=0.5,
                                                timeout=lease.lease_seconds() + 5))
    for look in looks:
        if look:
            token = _load(connection_id)
        settled = _settled(connection_id, token, need)
        if settled is not None:
            return settled
        claimed = lease.claim_and_load(connection_id, claimant)
        if claimed is not None:
            return claimed
        if not wait:
            return RefreshResult(Outcome.BUSY, connection_id, token)
    raise BrexUnavailable("Another worker is still refreshing this Brex connection.")


@sensitive_variables()
def _refresh_under_claim(
    token: BrexToken, claimant: str, need: _Need, *, budget: bool
) -> RefreshResult:
    """Refresh ``token``, read under this caller's claim, and release the claim whatever
    happens (saving the tokens releases it in the same statement)."""
    connection_id = token.connection_id
    claimed_at = time.monotonic()
    released = False
    try:
        # The previous holder of the claim may have finished in between.
        settled = _settled(connection_id, token, need)
        if settled is not None:
            return settled
        if budget:
            ticket = throttle.take_sweep_budget()
            if not ticket.granted:
                return RefreshResult(
                    Outcome.DEFERRED, connection_id, token, retry_after=ticket.resets_in
                )
        result = _refresh_claimed(token, claimant, claimed_at, need)
        # Saving the tokens (or marking the connection) cleared the claim already.
        released = result.outcome in (Outcome.REFRESHED, Outcome.NEEDS_REAUTH)
        return result
    finally:
        if not released:
            lease.release_claim(connection_id, claimant)


@sensitive_variables()
def _refresh_claimed(
    token: BrexToken,
    claimant: str,
    claimed_at: float,
    needs_refresh: _Need,
) -> RefreshResult:
    connection_id = token.connection_id
    sent = token.refresh_token or ""
    # The Brex the connection was made at, whichever ENVIRONMENT is configured now.
    issuer = brex_settings.issuer_for(token.connection.environment)
    # A setting that cannot work must fail before Brex rotates anything, not after.
    oauth.required_api_scopes()
    for _ in range(_MAX_TOKEN_SWAPS + 1):
        try:
            # Resolve the endpoint first (it may need a request), then make sure a whole
            # lease is left for the token call.
            discovery.get_endpoint("token_endpoint", issuer=issuer)
            if time.monotonic() - claimed_at > 1.0:
                lease.renew_claim(connection_id, claimant)
            answer = oauth.refresh(sent, issuer=issuer)
            if not answer.problems:
                # Tokens for another Brex user, or from another issuer, are never stored. (Of
                # a malformed answer only the refresh token is kept, which is only ever sent
                # back to the token endpoint, and its next answer is checked.)
                oauth.validate_refreshed_tokens(
                    answer, subject=token.connection.brex_user_id, issuer=issuer
                )
        except InvalidClient as err:
            # The site's client id or secret, not this customer's grant: keep every
            # connection active and pause refreshing until the credentials work again.
            throttle.client_rejected(err, connection=token.connection)
            paused = RefreshPaused(
                f"Refreshing is paused for every connection: Brex refused this site's client "
                f"credentials ({err.error}). The customer need not reconnect.",
                retry_after=brex_settings.CLIENT_REJECTED_PROBE_INTERVAL,
            )
            _record_transient_failure(connection_id, paused)
            raise paused from err
        except InvalidGrant as err:
            result = _mark_needs_reauth(connection_id, err, sent)
            if result is not None:
                return result
            # Another worker stored a different refresh token meanwhile: use that instead.
            current = _load(connection_id)
            if current is None or current.connection.status != ConnectionStatus.ACTIVE:
                return RefreshResult(Outcome.NOT_ACTIVE, connection_id, current)
            if not needs_refresh(current):
                return RefreshResult(Outcome.NOT_DUE, connection_id, current)
            token, sent = current, current.refresh_token or ""
            claimed_at = 0.0  # renew before the next call
            continue
        except DiscoveryError as err:
            _record_transient_failure(connection_id, err)
            raise BrexUnavailable(str(err)) from err
        except BrexUnavailable as err:
            # A Retry-After holds back every worker, not only this one.
            throttle.hold_for(throttle.token_scope(token.connection.environment), err)
            _record_transient_failure(connection_id, err)
            raise
        except TokenError as err:
            _record_transient_failure(connection_id, err)
            raise
        return _save(token, claimant, sent, answer)
    raise BrexUnavailable("The stored refresh token kept changing while refreshing.")


@sensitive_variables()
def _save(
    started: BrexToken, claimant: str, sent: str, answer: oauth.TokenResponse
) -> RefreshResult:
    """Save Brex's answer over the tokens the refresh started from, and nothing else.

    The tokens are replaced only if they are still the generation ``started`` read and the
    connection is still active; otherwise (a reconnect, a disconnect, another worker that
    saved first) this answer is discarded by :func:`_discard`. A malformed answer saves only
    the rotated refresh token it carries, if any, and raises
    :class:`MalformedTokenResponse`.
    """
    connection_id = started.connection_id
    rotated = answer.refresh_token is not None and answer.refresh_token != sent
    error: MalformedTokenResponse | None = None
    if answer.problems:
        error = MalformedTokenResponse(answer.problems)
        if not rotated:
            _record_transient_failure(connection_id, error)
            raise error
        plan = refresh_save.plan_malformed(started, claimant, answer, error)
    else:
        plan = refresh_save.plan_refreshed(started, claimant, answer, rotated)
    token = refresh_save.write_within_grace(started, plan, answer)
    if token is None:
        return _discard(started, answer, rotated)
    if error is not None:
        logger.warning(
            "Brex connection %s: %s The new refresh token was saved.", connection_id, error
        )
        raise error
    outcome = Outcome.NEEDS_REAUTH if plan.needs_reauth else Outcome.REFRESHED
    if plan.needs_reauth:
        logger.warning("Brex connection %s needs re-authorization: %s", connection_id,
                       plan.connection_fields["last_error"])
    else:
        logger.info("Refreshed Brex connection %s (refresh token %s).", connection_id,
                    "rotated" if rotated else "kept")
    return RefreshResult(outcome, connection_id, token, rotated=rotated)


@sensitive_variables()
def _discard(started: BrexToken, answer: oauth.TokenResponse, rotated: bool) -> RefreshResult:
    """The tokens changed while Brex was answering: keep the stored ones, and make Brex
    forget the answer's unless they belong to the same grant as the stored ones."""
    connection_id = started.connection_id
    current = _load(connection_id)
    same_grant = (
        current is not None
        and current.connection.status == ConnectionStatus.ACTIVE
        and current.connection.connected_at == started.connection.connected_at
    )
    if same_grant:
        # Another worker (one that took over an expired claim) saved tokens of this same
        # grant first. Revoking this answer's refresh token would revoke those too.
        detail = (
            "Another refresh saved newer tokens first; the tokens Brex gave this one were "
            "not stored."
        )
    else:
        detail = (
            "The connection was reconnected or disconnected while Brex was answering a "
            "refresh; the tokens Brex gave that refresh were not stored, and were revoked "
            "at Brex."
        )
        issuer = brex_settings.issuer_for(started.connection.environment)
        if rotated:
            oauth.revoke_quietly(answer.refresh_token, "refresh_token", issuer=issuer)
        elif answer.access_token:
            oauth.revoke_quietly(answer.access_token, "access_token", issuer=issuer)
    if current is not None:
        ConnectionEvent.objects.create(
            connection_id=connection_id, kind=EventKind.REFRESH_DISCARDED,
            detail=with_team_note(detail, current.connection),
        )
    logger.info("Brex connection %s: %s", connection_id, detail)
    if current is None or current.connection.status != ConnectionStatus.ACTIVE:
        return RefreshResult(Outcome.NOT_ACTIVE, connection_id, current)
    return RefreshResult(Outcome.NOT_DUE, connection_id, current)


@sensitive_variables()
def _mark_needs_reauth(
    connection_id: int, err: TokenError, sent: str
) -> RefreshResult | None:
    """Mark the connection ``needs_reauth`` unless its refresh token changed since ``sent``
    was read (then return None so the caller uses the new one)."""
    with write_transaction():
        connection = BrexConnection.objects.select_for_update().get(pk=connection_id)
        token = BrexToken.objects.select_for_update().get(pk=connection_id)
        if token.refresh_token and token.refresh_token != sent:
            return None
        if connection.status != ConnectionStatus.ACTIVE:
            return RefreshResult(Outcome.NOT_ACTIVE, connection_id, token)
        reason = f"Brex refused the refresh token ({err.error})"
        if err.description:
            reason += f": {err.description}"
        connection.status = ConnectionStatus.NEEDS_REAUTH
        connection.last_error = reason[:2000]
        connection.save(update_fields=["status", "last_error", "updated_at"])
        # The access token is of no further use; the refresh token is kept (encrypted) so
        # that a disconnect can still ask Brex to revoke it.
        token.access_token = None
        token.access_token_expires_at = None
        token.refresh_claimed_until = None
        token.refresh_claimed_by = ""
        token.save()
        team = connection.owning_team
        ConnectionEvent.objects.create(
            connection=connection,
            kind=EventKind.NEEDS_REAUTH,
            detail=" ".join(filter(None, (
                reason[:2000], "The customer must connect again.", team_note(team)
            ))),
        )
        error, description = err.error, err.description
        transaction.on_commit(
            lambda: signals.refresh_failed.send(
                sender=BrexConnection, connection=connection, error=error,
                description=description, team=team,
            )
        )
    logger.warning("Brex connection %s needs re-authorization: %s", connection_id, err.error)
    return RefreshResult(Outcome.NEEDS_REAUTH, connection_id, token)


def _forget_access_token(connection_id: int) -> None:
    """Wipe the access token of a connection that is not active (it cannot be used), which
    also takes it out of the sweep's indexes."""
    with write_transaction():
        connection = BrexConnection.objects.select_for_update().get(pk=connection_id)
        if connection.status != ConnectionStatus.ACTIVE:
            BrexToken.objects.filter(pk=connection_id).update(
                access_token=None, access_token_expires_at=None
            )


def _record_transient_failure(connection_id: int, err: BrexOAuthError) -> None:
    reason = f"Refresh failed, will retry: {err}"[:2000]
    with write_transaction():
        BrexConnection.objects.filter(pk=connection_id).update(
            last_error=reason, updated_at=timezone.now()
        )
        ConnectionEvent.objects.create(
            connection_id=connection_id, kind=EventKind.REFRESH_FAILED,
            detail=with_team_note(reason, connection_id),
        )
    logger.warning("Refreshing Brex connection %s failed: %s", connection_id, err)


# The sweep ---------------------------------------------------------------------------------
