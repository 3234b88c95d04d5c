"""Connections to Brex accounts, their encrypted tokens, pending authorizations and events."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from .conf import REQUIRED_SCOPES, brex_settings, team_model_setting
from .fields import EncryptedTextField
from .teams import get_team_policy

# The webhook tables have a module of their own; Django registers them as this module
# imports them, and callers find them here too.
from .webhook_models import BrexWebhookEvent as BrexWebhookEvent
from .webhook_models import BrexWebhookSubscription as BrexWebhookSubscription
from .webhook_models import SubscriptionStatus as SubscriptionStatus
from .webhook_models import WebhookEventStatus as WebhookEventStatus


class Environment(models.TextChoices):
    PRODUCTION = "production", _("Production")
    STAGING = "staging", _("Staging")


class ConnectionStatus(models.TextChoices):
    ACTIVE = "active", _("Active")
    NEEDS_REAUTH = "needs_reauth", _("Needs re-authorization")
    REVOKED = "revoked", _("Revoked")


class RevocationStatus(models.TextChoices):
    NOT_REQUESTED = "", _("Not requested")
    PENDING = "pending", _("Pending at Brex")
    DONE = "done", _("Revoked at Brex")
    #: The stored tokens could not be decrypted, so Brex could not be asked.
    NOT_POSSIBLE = "not_possible", _("Brex could not be told")


def team_note(team) -> str:
    """How a connection event names ``team`` ("" for None): "For team <name> (id <pk>)."."""
    return "" if team is None else f"For team {team} (id {team.pk})."


def with_team_note(detail: str, connection) -> str:
    """``detail`` followed by the :func:`team_note` of ``connection``'s team (a connection,
    or its primary key: then the team is read, one query, only with a team model), so that
    every event of a team's connection names the team."""
    if team_model_setting() is None:
        return detail
    if not isinstance(connection, BrexConnection):
        connection = (
            BrexConnection.objects.select_related("team").filter(pk=connection).first()
        )
    team = connection.owning_team if connection is not None else None
    return " ".join(filter(None, (detail, team_note(team))))


def owner_deleted(collector, field, sub_objs, using):
    """``on_delete`` of ``BrexConnection.owner`` when a team model is configured.

    A team's connection outlives the user who connected it: its ``owner`` becomes null and
    it stays active for the team. A personal connection (no team) goes with its owner, as
    without teams, and is revoked at Brex by the ``pre_delete`` receiver.
    """
    objs = list(sub_objs)
    team_owned = [obj for obj in objs if obj.team_id is not None]
    personal = [obj for obj in objs if obj.team_id is None]
    if team_owned:
        collector.add_field_update(field, None, team_owned)
    if personal:
        # The stubs type sub_objs as a QuerySet; CASCADE only hands it to Collector.collect()
        # and add_field_update(), which take a list too.
        models.CASCADE(collector, field, personal, using)  # type: ignore[arg-type]


class BrexConnectionQuerySet(models.QuerySet):
    def for_user(self, user) -> BrexConnectionQuerySet:
        """Every connection ``user`` may see on the site: their own personal connections
        and, with a team model, the connections of the teams the team policy lets them see.

        Staff's wider view is the admin's (the model permissions), not this.
        """
        if not getattr(user, "is_authenticated", False):
            return self.none()
        if team_model_setting() is None:
            return self.filter(owner=user)
        return self.filter(
            models.Q(owner=user, team__isnull=True)
            | models.Q(team__in=get_team_policy().visible_teams(user))
        )

    def for_team(self, team) -> BrexConnectionQuerySet:
        """The connections of ``team`` (an instance of the team model, or its key)."""
        if team_model_setting() is None:
            raise ImproperlyConfigured("for_team() needs settings.BREX_OAUTH_TEAM_MODEL.")
        return self.filter(team=team)


#: The team model when the models were built: like a swappable model setting, it shapes the
#: table, so the class below reads it once, here (which also lets mypy see it is a str).
_TEAM_MODEL = team_model_setting()


# What a team model changes in BrexConnection, one definition for each shape: the model
# below and the brex_oauth_team_schema command (which turns teams on or off on a site whose
# tables exist) both build it from these.


def owner_field(*, teams: bool) -> models.ForeignKey:
    """``BrexConnection.owner``: with teams, nullable and kept (as null) when the user who
    connected a team's connection is deleted."""
    if not teams:
        return models.ForeignKey(
            settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="brex_connections",
            verbose_name=_("owner"),
        )
    return models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=owner_deleted, null=True, blank=True,
        related_name="brex_connections", verbose_name=_("owner"),
    )


def team_field(team_model: str) -> models.ForeignKey:
    """``BrexConnection.team``. A team deleted: its connections are deleted with it, and the
    pre_delete receiver revokes each at Brex before the rows go."""
    return models.ForeignKey(
        team_model, on_delete=models.CASCADE, null=True, blank=True,
        related_name="brex_connections", verbose_name=_("team"),
    )


def owner_brex_user_constraint(*, teams: bool) -> models.UniqueConstraint:
    """One connection per owner and Brex user. A team's connection is unique per team and
    company instead (a member may also hold the same Brex user personally)."""
    return models.UniqueConstraint(
        fields=["owner", "environment", "brex_user_id"],
        name="brex_oauth_unique_owner_brex_user",
        condition=models.Q(team__isnull=True) if teams else None,
    )


def team_company_constraint() -> models.UniqueConstraint:
    """One live connection per team, environment and Brex company."""
    return models.UniqueConstraint(
        fields=["team", "environment", "brex_company_id"],
        name="brex_oauth_unique_team_company",
        condition=models.Q(team__isnull=False, status="active") & ~models.Q(brex_company_id=""),
    )


class BrexConnection(models.Model):
    """A link to one Brex user in one Brex environment, made by a site user (``owner``)
    for themselves or, with ``BREX_OAUTH_TEAM_MODEL`` set, for a team (``team``).

    The same Brex user connected again by the same owner updates this row rather than
    adding another; a team holds one connection per Brex company and environment.
    Tokens live in :class:`BrexToken` (``connection.token``) so that listing connections
    never loads a secret.
    """

    Status = ConnectionStatus

    owner = owner_field(teams=_TEAM_MODEL is not None)
    if _TEAM_MODEL is not None:
        team = team_field(_TEAM_MODEL)
    environment = models.CharField(
        max_length=16, choices=Environment.choices, verbose_name=_("environment")
    )
    brex_user_id = models.CharField(
        _("Brex user id"), max_length=255, help_text=_("The id_token subject (sub).")
    )
    brex_user_email = models.EmailField(_("Brex user email"), blank=True)
    brex_company_id = models.CharField(_("Brex company id"), max_length=255, blank=True)
    brex_company_name = models.CharField(_("Brex company"), max_length=255, blank=True)
    granted_scopes = models.TextField(
        verbose_name=_("granted scopes"),
        blank=True, help_text=_("Space-separated scopes the customer granted.")
    )
    status = models.CharField(
        verbose_name=_("status"),
        max_length=16, choices=ConnectionStatus.choices, default=ConnectionStatus.ACTIVE
    )
    connected_at = models.DateTimeField(default=timezone.now, verbose_name=_("connected at"))
    updated_at = models.DateTimeField(auto_now=True, verbose_name=_("updated at"))
    last_refreshed_at = models.DateTimeField(
        null=True, blank=True, verbose_name=_("last refreshed at")
    )
    revoked_at = models.DateTimeField(null=True, blank=True, verbose_name=_("revoked at"))
    revocation_status = models.CharField(
        verbose_name=_("revocation status"),
        max_length=16, choices=RevocationStatus.choices, blank=True, default=""
    )
    revocation_attempts = models.PositiveIntegerField(
        verbose_name=_("revocation attempts"),
        default=0, help_text=_("Requests sent to Brex to revoke this connection so far.")
    )
    revocation_attempted_at = models.DateTimeField(
        verbose_name=_("revocation attempted at"),
        null=True, blank=True, help_text=_("When Brex was last asked to revoke this connection.")
    )
    last_error = models.TextField(blank=True, verbose_name=_("last error"))

    objects = BrexConnectionQuerySet.as_manager()

    class Meta:
        verbose_name = _("Brex connection")
        verbose_name_plural = _("Brex connections")
        ordering = ["-connected_at"]
        constraints = [
            owner_brex_user_constraint(teams=_TEAM_MODEL is not None),
            *([] if _TEAM_MODEL is None else [team_company_constraint()]),
        ]
        permissions = [("revoke_brexconnection", "Can revoke Brex connections at Brex")]
        indexes = [
            # The revocation sweep: the few connections whose revocation Brex has not
            # confirmed yet, by when it was last tried.
            models.Index(
                fields=["revocation_attempted_at"],
                name="brex_oauth_revocation_pending",
                condition=models.Q(revocation_status="pending"),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.display_name or self.brex_user_id} ({self.environment}, {self.status})"

    @property
    def display_name(self) -> str:
        """How pages and messages name this connection: the Brex company's name, else the
        Brex user's email; "" when Brex gave neither."""
        return self.brex_company_name or self.brex_user_email

    @property
    def owning_team(self):
        """The team this connection belongs to; None for a personal connection, and always
        None without ``BREX_OAUTH_TEAM_MODEL`` (where the model has no ``team`` field)."""
        if team_model_setting() is None or self.team_id is None:
            return None
        return self.team

    @property
    def scopes(self) -> list[str]:
        """Granted scopes as a list."""
        return self.granted_scopes.split()

    @property
    def api_scopes(self) -> list[str]:
        """Granted scopes other than ``openid`` and ``offline_access``."""
        return [s for s in self.scopes if s not in REQUIRED_SCOPES]

    def has_scope(self, *scopes: str) -> bool:
        """True when any of ``scopes`` was granted."""
        granted = set(self.scopes)
        return any(scope in granted for scope in scopes)

    @property
    def is_active(self) -> bool:
        return self.status == ConnectionStatus.ACTIVE


# When are a connection's tokens due for a refresh? -------------------------------------------
#
# One rule, defined here and nowhere else: the sweep's query (refresh_candidates), its two
# partial indexes, BrexToken.is_due_for_refresh() and the refresh service are built from
# the three definitions below, and tests/test_due_rule.py proves the query and the method
# agree row for row.

#: The token rows the sweep looks at, and the condition of its two partial indexes: those
#: with an access token expiry. The services wipe that expiry when a connection stops being
#: active, which takes it out of the sweep (and of the indexes) without a join.
SWEPT_TOKENS = models.Q(access_token_expires_at__isnull=False)

#: Each arm's partial index key, the order the sweep reads the arm in and its batches'
#: keyset: the instant, then the connection (a batch starts after the last row of the one
#: before, an index range however many tokens share that instant).
DUE_KEY = ("access_token_expires_at", "connection_id")
IDLE_KEY = ("refresh_token_used_at", "connection_id")


def due_limits(now: datetime) -> tuple[datetime, datetime]:
    """(expires by, idle since): tokens are due when the access token expires by the first
    (``REFRESH_MARGIN`` seconds from ``now``) or the refresh token was last used at Brex by
    the second (``REFRESH_TOKEN_REFRESH_AGE`` seconds before ``now``)."""
    return (
        now + timedelta(seconds=brex_settings.REFRESH_MARGIN),
        now - timedelta(seconds=brex_settings.REFRESH_TOKEN_REFRESH_AGE),
    )


def due_condition(now: datetime) -> models.Q:
    """The rule as a query condition on the token table (swept rows only)."""
    expires_by, idle_since = due_limits(now)
    return (
        SWEPT_TOKENS
        & models.Q(refresh_token__isnull=False)
        & (
            models.Q(access_token_expires_at__lte=expires_by)
            | models.Q(refresh_token_used_at__lte=idle_since)
        )
    )


class BrexTokenQuerySet(models.QuerySet):
    def refresh_candidates(self, now: datetime | None = None) -> BrexTokenQuerySet:
        """Tokens that are due for a refresh, read from this table alone.

        Due means the access token expires within ``REFRESH_MARGIN`` seconds, or the refresh
        token has not been used for ``REFRESH_TOKEN_REFRESH_AGE`` seconds
        (:func:`due_condition`). Each arm is answered by its own partial index
        (``brex_oauth_token_due``, ``brex_oauth_token_idle``), so the cost follows the
        number of due rows, not the size of the table. The connection's status is not
        checked here: see :meth:`due_for_refresh`.
        """
        return self.filter(due_condition(now or timezone.now()))

    def due_for_refresh(self, now: datetime | None = None) -> BrexTokenQuerySet:
        """Tokens of active connections that are due for a refresh (one query, joined).

        The sweep itself reads :meth:`refresh_candidates` and checks the status of each batch
        by primary key, which PostgreSQL answers far faster at a million connections than
        this join (it would scan every connection to hash it).
        """
        return self.refresh_candidates(now).filter(connection__status=ConnectionStatus.ACTIVE)

    def unclaimed(self, now: datetime | None = None) -> BrexTokenQuerySet:
        """Tokens no worker is refreshing right now (no claim, or an expired one)."""
        now = now or timezone.now()
        return self.filter(
            models.Q(refresh_claimed_until__isnull=True) | models.Q(refresh_claimed_until__lt=now)
        )


def connection_pk(connection: BrexConnection | int) -> int:
    """The primary key of a connection passed either as the model or as its key."""
    return int(connection.pk if isinstance(connection, BrexConnection) else connection)


class BrexToken(models.Model):
    """A connection's tokens, encrypted at rest, and the refresh bookkeeping.

    The token values never appear in ``repr``, ``str``, the admin or logs.
    """

    connection = models.OneToOneField(
        BrexConnection, on_delete=models.CASCADE, primary_key=True, related_name="token"
    )
    access_token = EncryptedTextField(null=True, blank=True)
    refresh_token = EncryptedTextField(null=True, blank=True)
    token_type = models.CharField(max_length=32, default="Bearer")
    access_token_expires_at = models.DateTimeField(null=True, blank=True)
    refresh_token_issued_at = models.DateTimeField(
        null=True, blank=True, db_index=True,
        help_text=_("When Brex first issued this refresh token chain; it dies 90 days later."),
    )
    refresh_token_expires_at = models.DateTimeField(null=True, blank=True)
    refresh_token_used_at = models.DateTimeField(
        default=timezone.now,
        help_text=_("When the stored refresh token was last received from or used at Brex."),
    )
    # A worker refreshing this connection holds a lease until this time; another
    # worker may take over once it has passed (a killed worker leaves nothing stuck).
    refresh_claimed_until = models.DateTimeField(null=True, blank=True)
    refresh_claimed_by = models.CharField(max_length=64, blank=True)
    generation = models.PositiveBigIntegerField(
        # In the database too, so rows inserted by raw SQL (bulk loads, benchmarks) get it.
        default=0,
        db_default=0,
        help_text=_(
            "Goes up each time the tokens are replaced (a refresh saved, a reconnect). A "
            "refresh saves its tokens only over the generation it started from."
        ),
    )
    updated_at = models.DateTimeField(auto_now=True)

    objects = BrexTokenQuerySet.as_manager()

    class Meta:
        verbose_name = _("Brex token")
        verbose_name_plural = _("Brex tokens")
        indexes = [
            # The two arms of the refresh sweep (due_for_refresh). Rows without an access
            # token expiry (revoked, or needing re-authorization) are left out of both.
            models.Index(
                fields=list(DUE_KEY),
                name="brex_oauth_token_due",
                condition=SWEPT_TOKENS,
            ),
            models.Index(
                fields=list(IDLE_KEY),
                name="brex_oauth_token_idle",
                condition=SWEPT_TOKENS,
            ),
        ]

    def __repr__(self) -> str:
        return f"<BrexToken connection={self.connection_id} expires={self.access_token_expires_at}>"

    def __str__(self) -> str:
        return f"Tokens of connection {self.connection_id}"

    def access_token_expires_within(self, seconds: float) -> bool:
        """True when the access token is missing or expires within ``seconds``."""
        if not self.access_token or self.access_token_expires_at is None:
            return True
        return self.access_token_expires_at <= timezone.now() + timedelta(seconds=seconds)

    def is_due_for_refresh(self, now: datetime | None = None) -> bool:
        """True when these tokens need a refresh by the sweep's rule (:func:`due_condition`),
        or have a refresh token but no usable access token (which the sweep, reading only
        rows with an access token expiry, leaves to an on-demand refresh)."""
        if not self.refresh_token:
            return False
        if not self.access_token or self.access_token_expires_at is None:
            return True
        expires_by, idle_since = due_limits(now or timezone.now())
        return self.access_token_expires_at <= expires_by or (
            self.refresh_token_used_at is not None and self.refresh_token_used_at <= idle_since
        )

    @property
    def refresh_token_days_left(self) -> int | None:
        """Whole days until the refresh token's estimated end (``refresh_token_expires_at``:
        ``REFRESH_TOKEN_LIFETIME`` after the last refresh; Brex does not say), or None."""
        if self.refresh_token_expires_at is None:
            return None
        return max(0, (self.refresh_token_expires_at - timezone.now()).days)


class DetachedRevocation(models.Model):
    """A token to revoke at Brex whose connection has been deleted.

    Deleting a connection (one row, a queryset, the admin, or a cascade from its owner)
    copies its refresh token here, encrypted, before the rows go, and hands it to the
    ``revoke_detached_token`` task; the revocation sweep picks up what a lost task left.
    Nothing here refers to the deleted rows, so the retries do not need them. The row is
    deleted as soon as Brex confirms the revocation.
    """

    token = EncryptedTextField()
    token_type_hint = models.CharField(max_length=32, default="refresh_token")
    environment = models.CharField(max_length=16, choices=Environment.choices)
    former_connection_id = models.PositiveBigIntegerField(
        help_text=_("The id the deleted connection had (for the log).")
    )
    brex_user_id = models.CharField(_("Brex user id"), max_length=255, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    attempts = models.PositiveIntegerField(
        default=0, help_text=_("Requests sent to Brex to revoke this token so far.")
    )
    attempted_at = models.DateTimeField(
        null=True, blank=True, help_text=_("When Brex was last asked to revoke this token.")
    )
    last_error = models.TextField(blank=True)

    class Meta:
        verbose_name = _("revocation of a deleted Brex connection")
        verbose_name_plural = _("revocations of deleted Brex connections")
        indexes = [
            models.Index(fields=["attempted_at"], name="brex_oauth_detached_attempted"),
        ]

    def __repr__(self) -> str:
        return (
            f"<DetachedRevocation pk={self.pk} connection={self.former_connection_id} "
            f"attempts={self.attempts}>"
        )

    def __str__(self) -> str:
        return f"Revocation of deleted connection {self.former_connection_id}"


class AuthorizationRequest(models.Model):
    """A pending authorization: state, PKCE verifier and nonce, used once and expiring."""

    state = models.CharField(max_length=128, unique=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+",
        verbose_name=_("user"),
    )
    environment = models.CharField(
        max_length=16, choices=Environment.choices, verbose_name=_("environment")
    )
    code_verifier = EncryptedTextField()
    nonce = models.CharField(max_length=128)
    redirect_uri = models.URLField(max_length=1000, verbose_name=_("redirect URI"))
    requested_scopes = models.TextField(verbose_name=_("requested scopes"))
    next_url = models.CharField(max_length=2000, blank=True, verbose_name=_("next URL"))
    prompt_login = models.BooleanField(default=False, verbose_name=_("prompt login"))
    # The team the connection is made for (its primary key as text, so that this table
    # does not change with BREX_OAUTH_TEAM_MODEL); empty for a personal connection.
    team_key = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(default=timezone.now, verbose_name=_("created at"))
    expires_at = models.DateTimeField(db_index=True, verbose_name=_("expires at"))
    consumed_at = models.DateTimeField(null=True, blank=True, verbose_name=_("consumed at"))

    class Meta:
        verbose_name = _("pending Brex authorization")
        verbose_name_plural = _("pending Brex authorizations")

    def __repr__(self) -> str:
        return f"<AuthorizationRequest pk={self.pk} user={self.user_id} expires={self.expires_at}>"

    @property
    def is_expired(self) -> bool:
        return self.expires_at <= timezone.now()


class EventKind(models.TextChoices):
    CONNECTED = "connected", _("Connected")
    RECONNECTED = "reconnected", _("Reconnected")
    REFRESHED = "refreshed", _("Tokens refreshed")
    REFRESH_FAILED = "refresh_failed", _("Refresh failed")
    REFRESH_DISCARDED = "refresh_discarded", _("Refreshed tokens discarded")
    SCOPES_CHANGED = "scopes_changed", _("Granted scopes changed")
    NEEDS_REAUTH = "needs_reauth", _("Needs re-authorization")
    DISCONNECTED = "disconnected", _("Disconnected")
    REVOKED = "revoked", _("Revoked at Brex")
    REVOKE_FAILED = "revoke_failed", _("Revocation at Brex failed")
    WEBHOOK_SUBSCRIBED = "webhook_subscribed", _("Subscribed to Brex webhooks")
    WEBHOOK_SUBSCRIBE_FAILED = "webhook_subscribe_failed", _("Webhook subscription failed")
    WEBHOOK_UNSUBSCRIBED = "webhook_unsubscribed", _("Unsubscribed from Brex webhooks")
    WEBHOOK_UNSUBSCRIBE_FAILED = "webhook_unsubscribe_failed", _("Webhook unsubscription failed")


class ConnectionEvent(models.Model):
    """Something that happened to a connection. ``detail`` never holds a secret."""

    Kind = EventKind

    connection = models.ForeignKey(
        BrexConnection, on_delete=models.CASCADE, related_name="events",
        verbose_name=_("connection"),
    )
    kind = models.CharField(max_length=32, choices=EventKind.choices, verbose_name=_("kind"))
    detail = models.TextField(blank=True, verbose_name=_("detail"))
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("actor"),
    )
    created_at = models.DateTimeField(
        default=timezone.now, db_index=True, verbose_name=_("created at")
    )

    class Meta:
        verbose_name = _("Brex connection event")
        verbose_name_plural = _("Brex connection events")
        ordering = ["-created_at", "-pk"]

    def __str__(self) -> str:
        return gettext("%(kind)s at %(when)s") % {
            "kind": self.get_kind_display(), "when": f"{self.created_at:%Y-%m-%d %H:%M:%S}"
        }


class ThrottleReason(models.TextChoices):
    NONE = "", _("None")
    RETRY_AFTER = "retry_after", _("Brex asked to wait (Retry-After)")
    CLIENT_REJECTED = "client_rejected", _("Brex refused the client credentials")


class BrexThrottle(models.Model):
    """When this site may next call one part of Brex, and how much of a rate budget it has
    used: one row per scope (see :mod:`django_brex_oauth.services.throttle`).

    It lives in the database because every worker on every host must see it: a
    ``Retry-After`` one process received holds back all of them, and the sweep's budget
    counts the requests of all of them. ``detail`` is log-safe (never a token or secret).
    """

    scope = models.CharField(max_length=200, unique=True)
    not_before = models.DateTimeField(
        null=True, blank=True, help_text=_("No request in this scope before this time.")
    )
    reason = models.CharField(
        max_length=32, choices=ThrottleReason.choices, blank=True, default=""
    )
    detail = models.TextField(blank=True)
    since = models.DateTimeField(null=True, blank=True, help_text=_("When the wait began."))
    window_started_at = models.DateTimeField(null=True, blank=True)
    window_used = models.PositiveIntegerField(default=0)
    window_refused = models.PositiveIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = _("Brex rate limit")
        verbose_name_plural = _("Brex rate limits")

    def __str__(self) -> str:
        return self.scope
