"""The ``BREX_OAUTH`` settings dict: each setting's type and default, lookup and the
documented Brex URLs.

Settings are read from :data:`django.conf.settings` on every access, so
``override_settings(BREX_OAUTH=...)`` takes effect immediately in tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar, cast, overload

from django.conf import settings
from django.urls import reverse
from django.views.decorators.debug import sensitive_variables

from .exceptions import BrexOAuthConfigurationError

PRODUCTION = "production"
STAGING = "staging"

#: Brex's documented auth base URL (the OpenID Connect issuer) per environment.
AUTH_BASE_URLS = {
    PRODUCTION: "https://accounts-api.brex.com/oauth2/default",
    STAGING: "https://accounts-api.staging.brexapps.com/oauth2/default",
}

#: Brex's documented API server per environment.
API_BASE_URLS = {
    PRODUCTION: "https://api.brex.com",
    STAGING: "https://api-staging.brex.com",
}

#: Scopes Brex needs on every authorization request: an OpenID Connect request
#: (``openid``) that returns a refresh token (``offline_access``).
REQUIRED_SCOPES = ("openid", "offline_access")

DAY = 24 * 3600

T = TypeVar("T")

#: What a numeric setting's value must be, in the message that refuses it.
_NOUNS: dict[Callable[[Any], Any], str] = {int: "a whole number", float: "a number"}


class Setting(Generic[T]):
    """One key of ``BREX_OAUTH``, declared once: its default and how a value is read.

    Declared as an attribute of :class:`BrexOAuthSettings` (whose attribute name is the
    key), it reads ``settings.BREX_OAUTH`` on every access and returns the value as ``T``:
    ``cast`` converts it (``int``, ``float`` or ``bool``; ``None``, the default, passes the
    value as it is and leaves its validation to the system checks), ``none`` lets ``None``
    through unconverted, and ``minimum`` raises a smaller number to it. A value ``cast``
    refuses raises :class:`~django_brex_oauth.exceptions.BrexOAuthConfigurationError`
    when read; system check ``brex_oauth.E012`` reports it at start-up.
    """

    name: str

    def __init__(
        self,
        default: T,
        cast: Callable[[Any], T] | None = None,
        *,
        none: bool = False,
        minimum: int | float | None = None,
    ) -> None:
        self.default = default
        self.cast = cast
        self.none = none
        self.minimum = minimum

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> Setting[T]: ...

    @overload
    def __get__(self, instance: BrexOAuthSettings, owner: type | None = None) -> T: ...

    def __get__(self, instance: BrexOAuthSettings | None, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return self.convert(instance._user_settings().get(self.name, self.default))

    @property
    def kind(self) -> str:
        """What a value must be, for messages: "a whole number", "a number"; "" when any
        value is read as it is."""
        noun = _NOUNS.get(self.cast, "") if self.cast is not None else ""
        return f"{noun} or None" if noun and self.none else noun

    def convert(self, value: Any) -> T:
        """``value``, set for this setting, as the app uses it."""
        if self.cast is None or (value is None and self.none):
            return value
        try:
            converted = self.cast(value)
        except (TypeError, ValueError):
            raise BrexOAuthConfigurationError(
                f"BREX_OAUTH['{self.name}'] must be {self.kind}, not {value!r}."
            ) from None
        if self.minimum is not None and converted < self.minimum:  # type: ignore[operator]
            return cast(T, self.minimum)
        return converted

    def problem(self, value: Any) -> str | None:
        """Why ``value`` cannot be this setting's value, or None."""
        try:
            self.convert(value)
        except BrexOAuthConfigurationError as err:
            return str(err)
        return None


class BrexOAuthSettings:
    """Attribute access to ``settings.BREX_OAUTH``, each key declared below as a
    :class:`Setting` with its default and type.

    An unknown key in ``BREX_OAUTH`` raises
    :class:`~django_brex_oauth.exceptions.BrexOAuthConfigurationError` (an
    ``ImproperlyConfigured``), so a misspelt setting is caught instead of silently ignored.
    """

    # Credentials issued by Brex developer support.
    CLIENT_ID = Setting[str | None](None)
    CLIENT_SECRET = Setting[str | None](None)
    # "production" or "staging": picks the documented auth and API base URLs.
    ENVIRONMENT = Setting(PRODUCTION)
    # API scopes to request; openid and offline_access are always added.
    SCOPES = Setting[Sequence[str]](["users.readonly", "companies.readonly"])
    # API scopes every connection must keep holding: a refresh after which Brex no longer
    # grants one of them marks the connection needs_reauth. "users" also counts for
    # "users.readonly".
    REQUIRED_API_SCOPES = Setting[Sequence[str]]([])
    # Override the auth base URL (discovery is read at ISSUER/.well-known/openid-configuration).
    ISSUER = Setting[str | None](None)
    # Override the API server.
    API_BASE_URL = Setting[str | None](None)
    # Absolute callback URL registered with Brex. When None, SITE_URL is joined to the
    # callback's path; the request's Host header is never used.
    REDIRECT_URI = Setting[str | None](None)
    # This site's public address (scheme, host and port, no path), e.g.
    # "https://partner.example.com"; the callback URL is this plus the callback's path in
    # the URLconf. Used when REDIRECT_URI is None.
    SITE_URL = Setting[str | None](None)
    # Always add prompt=login so the person signs in to Brex again.
    FORCE_LOGIN = Setting(False, bool)
    # Where to send the person after connecting when no safe ``next`` was given (a URL or
    # a URL pattern name; the default is the page listing their connections).
    CONNECT_REDIRECT_URL = Setting("brex_oauth:connections")
    # Where to send the person after disconnecting when no safe ``next`` was given.
    DISCONNECT_REDIRECT_URL = Setting("brex_oauth:connections")
    # Token encryption key, and older keys still accepted for reading (rotation).
    ENCRYPTION_KEY = Setting[str | None](None)
    ENCRYPTION_KEY_FALLBACKS = Setting[Sequence[str]]([])
    # Seconds a pending authorization request (state, PKCE verifier, nonce) lives.
    AUTHORIZATION_REQUEST_TTL = Setting(600, int)
    # id_token signature algorithms accepted; "none" is never accepted.
    ID_TOKEN_ALGORITHMS = Setting[Sequence[str]](["RS256"])
    # Seconds of clock skew tolerated when checking id_token times.
    ID_TOKEN_LEEWAY = Setting(60, int)
    # Seconds an id_token may have been issued before it is checked (its ``iat`` at most this
    # far in the past, plus ID_TOKEN_LEEWAY); an older one is refused as stale.
    ID_TOKEN_MAX_AGE = Setting(300, int)
    # Seconds before an HTTP request to Brex gives up.
    HTTP_TIMEOUT = Setting[float](10.0, float)
    # Seconds the discovery document and JWKS stay cached.
    DISCOVERY_CACHE_TIMEOUT = Setting(3600, int)
    # Django cache alias used for discovery, JWKS and client-credentials tokens.
    CACHE_ALIAS = Setting("default")
    # Access-token lifetime assumed when Brex omits ``expires_in``.
    DEFAULT_ACCESS_TOKEN_LIFETIME = Setting(3600, int)
    # Brex forgets a refresh token this many seconds after it was first issued.
    REFRESH_TOKEN_LIFETIME = Setting(90 * DAY, int)
    # Refresh when the access token expires within this many seconds.
    REFRESH_MARGIN = Setting[float](600, float)
    # Refresh when the stored refresh token has not been used for this many seconds (an
    # idle connection is still refreshed long before Brex would forget its refresh token).
    REFRESH_TOKEN_REFRESH_AGE = Setting[float](60 * DAY, float)
    # Seconds a worker's claim on a connection's refresh lasts before others may take over.
    # At least HTTP_TIMEOUT + 5 is used; keep it under Brex's refresh-token grace period
    # (Okta's default: 30 s) so a worker taking over from a killed one can still use the
    # refresh token the killed worker had sent.
    REFRESH_LEASE_SECONDS = Setting[float](25, float)
    # Seconds to keep retrying the save of refreshed tokens while the database fails (a
    # dropped connection, say), counted from Brex's answer. Keep it under Brex's grace
    # period for a rotated-out refresh token (Okta's default: 30 s): past it, the old
    # refresh token is dead too and an unsaved new one is lost.
    REFRESH_SAVE_RETRY_SECONDS = Setting[float](20, float)
    # The API client refreshes before a call when the access token expires within this
    # many seconds.
    CLIENT_REFRESH_MARGIN = Setting[float](60, float)
    # Retries of the refresh task after a transient failure (timeout, 429, 5xx).
    REFRESH_TASK_MAX_RETRIES = Setting(5, int)
    # Base and cap, in seconds, of the refresh task's exponential backoff (with jitter).
    REFRESH_RETRY_BACKOFF = Setting[float](15, float)
    REFRESH_RETRY_BACKOFF_MAX = Setting[float](300, float)
    # Due ids the sweep reads per query, and refresh tasks it sends per broker connection.
    SWEEP_BATCH_SIZE = Setting(500, int, minimum=1)
    # The sweep's shared rate budget: at most this many token requests per SWEEP_RATE_WINDOW
    # seconds, counted in the database across every worker and host (Brex allows 1,000
    # requests per 60 s per client and account; the rest is left for on-demand refreshes).
    SWEEP_RATE_LIMIT = Setting(500, int, minimum=1)
    SWEEP_RATE_WINDOW = Setting[float](60, float)
    # The longest Retry-After honoured, in seconds (a longer one is taken as this).
    RETRY_AFTER_MAX = Setting[float](3600, float)
    # While Brex refuses the client credentials (invalid_client), refreshing is paused for
    # every connection and the credentials are probed once per this many seconds.
    CLIENT_REJECTED_PROBE_INTERVAL = Setting[float](300, float)
    # Retries (after the first attempt) of an idempotent API call on 429 / 5xx / network errors.
    API_MAX_RETRIES = Setting(3, int)
    # Base seconds of the exponential backoff between retries of an API call, and its cap.
    RETRY_BACKOFF = Setting[float](0.5, float)
    RETRY_BACKOFF_MAX = Setting[float](20.0, float)
    # Seconds before a client-credentials token's expiry at which a new one is fetched.
    CLIENT_CREDENTIALS_MARGIN = Setting[float](300, float)
    # Days events are kept before the cleanup task prunes them (None keeps them forever).
    EVENT_RETENTION_DAYS = Setting[int | None](365, int, none=True)
    # Days the routine "refreshed" events are kept (one per connection about every 50
    # minutes); None keeps them as long as other events.
    REFRESH_EVENT_RETENTION_DAYS = Setting[int | None](30, int, none=True)
    # Retries of the revocation task while Brex cannot be reached; after the last one the
    # revocation stays pending and the revocation sweep tries it again.
    REVOKE_TASK_MAX_RETRIES = Setting(6, int)
    # Base and cap, in seconds, of the revocation task's exponential backoff (with jitter).
    # The sweep leaves a pending revocation alone until its last try is this cap old.
    REVOKE_RETRY_BACKOFF = Setting[float](30, float)
    REVOKE_RETRY_BACKOFF_MAX = Setting[float](900, float)
    # The admin's "expiring soon" filter: refresh tokens within this many days of their end.
    EXPIRING_SOON_DAYS = Setting(14, int)
    # Brex webhook event types each connection subscribes to when it connects (in this
    # order); empty subscribes to nothing.
    WEBHOOK_EVENT_TYPES = Setting[Sequence[str]]([])
    # The public HTTPS URL of the webhook receiver (brex_oauth:webhook), sent to Brex as is.
    WEBHOOK_URL = Setting[str | None](None)
    # Seconds a webhook's Webhook-Timestamp may be from now, in either direction.
    WEBHOOK_TOLERANCE = Setting[float](300, float)
    # Dotted path of the callable returning the current webhook signing secrets.
    WEBHOOK_SECRETS_FETCHER = Setting[Any]("django_brex_oauth.webhooks.fetch_secrets_from_brex")
    # Seconds the webhook signing secrets stay cached.
    WEBHOOK_SECRETS_CACHE_TIMEOUT = Setting(3600, int)
    # Run the webhook handlers (the app's own and the webhook_received signal) in a Celery
    # task instead of in the request, right after the event is stored.
    WEBHOOK_PROCESS_IN_TASK = Setting(False, bool)
    # Retries of the subscription task while Brex cannot be reached, and the base and cap,
    # in seconds, of its exponential backoff (with jitter).
    WEBHOOK_TASK_MAX_RETRIES = Setting(6, int)
    WEBHOOK_RETRY_BACKOFF = Setting[float](30, float)
    WEBHOOK_RETRY_BACKOFF_MAX = Setting[float](900, float)
    # Days webhook events are kept before the cleanup task prunes them (None keeps them).
    WEBHOOK_EVENT_RETENTION_DAYS = Setting[int | None](90, int, none=True)
    # With settings.BREX_OAUTH_TEAM_MODEL: dotted path of the class that says who may
    # connect for a team, see its connections, reconnect and disconnect them.
    TEAM_POLICY = Setting("django_brex_oauth.teams.TeamPolicy")
    # The default policy's many-to-many relation from the team model to its members.
    TEAM_MEMBERS_ATTR = Setting("members")

    # The dict holds CLIENT_SECRET, and an unknown key raises with it in this frame.
    @sensitive_variables("value")
    def _user_settings(self) -> dict[str, Any]:
        # Read at every setting's every use (tests and reloads change settings), so the
        # common case is one subset test of the keys; anything else is refused below.
        value = getattr(settings, "BREX_OAUTH", None) or {}
        if isinstance(value, dict) and value.keys() <= DEFAULTS.keys():
            return value
        _refuse_user_settings(value)

    if not TYPE_CHECKING:  # so that mypy reports a misspelt setting

        def __getattr__(self, name: str) -> Any:
            raise AttributeError(f"Invalid BREX_OAUTH setting: {name!r}")

    # Derived values -----------------------------------------------------------------

    @property
    def issuer(self) -> str:
        """The OpenID Connect issuer: ``ISSUER`` or the environment's documented URL."""
        return self.issuer_for(None)

    @property
    def api_base_url(self) -> str:
        """The API server: ``API_BASE_URL`` or the environment's documented URL."""
        return self.api_base_url_for(None)

    def issuer_for(self, environment: str | None) -> str:
        """The issuer of a connection made in ``environment`` (None: the configured one).

        ``ISSUER`` overrides the configured ``ENVIRONMENT``'s URL only: a connection made in
        the other environment keeps talking to that environment's documented Brex.
        """
        return self._url_for(environment, self.ISSUER, AUTH_BASE_URLS)

    def api_base_url_for(self, environment: str | None) -> str:
        """The API server of a connection made in ``environment`` (None: the configured
        one); ``API_BASE_URL`` overrides the configured ``ENVIRONMENT``'s URL only."""
        return self._url_for(environment, self.API_BASE_URL, API_BASE_URLS)

    def _url_for(self, environment: str | None, override: Any, documented: dict) -> str:
        configured = self.environment
        environment = environment or configured
        if environment == configured and override:
            return str(override).rstrip("/")
        if environment not in documented:
            raise BrexOAuthConfigurationError(
                f"Unknown Brex environment {environment!r}: 'production' or 'staging'."
            )
        return documented[environment]

    @property
    def redirect_uri(self) -> str | None:
        """The callback URL sent to Brex: ``REDIRECT_URI``, else ``SITE_URL`` joined to the
        callback's path (``reverse("brex_oauth:callback")``, so a script prefix is kept);
        None when neither is set.

        Never built from a request: with a lax ``ALLOWED_HOSTS`` a forged ``Host`` header
        would otherwise choose where Brex sends the authorization code.
        """
        if self.REDIRECT_URI:
            return str(self.REDIRECT_URI)
        if self.SITE_URL:
            return str(self.SITE_URL).rstrip("/") + reverse("brex_oauth:callback")
        return None

    @property
    def environment(self) -> str:
        env = self.ENVIRONMENT
        if env not in AUTH_BASE_URLS:
            raise BrexOAuthConfigurationError(
                f"BREX_OAUTH['ENVIRONMENT'] must be 'production' or 'staging', not {env!r}."
            )
        return env

    @property
    def scopes(self) -> list[str]:
        """Scopes to request: openid and offline_access first, then the configured ones."""
        scopes = list(REQUIRED_SCOPES)
        for scope in self.SCOPES or ():
            if scope not in scopes:
                scopes.append(scope)
        return scopes

    @property
    def encryption_keys(self) -> list[str]:
        """Keys for token encryption: the current one first, then the fallbacks.

        Without ``ENCRYPTION_KEY`` the app uses ``SECRET_KEY`` (check ``brex_oauth.W001``
        warns), the string itself, so that moving off it is the usual rotation: the old
        ``SECRET_KEY`` goes into ``ENCRYPTION_KEY_FALLBACKS``.
        """
        primary = self.ENCRYPTION_KEY or settings.SECRET_KEY
        return [primary, *(self.ENCRYPTION_KEY_FALLBACKS or [])]


# Every setting's declaration, by name (documented in docs/reference.rst).
SETTINGS: dict[str, Setting[Any]] = {
    name: value for name, value in vars(BrexOAuthSettings).items() if isinstance(value, Setting)
}

DEFAULTS: dict[str, Any] = {name: setting.default for name, setting in SETTINGS.items()}

brex_settings = BrexOAuthSettings()


# The dict holds CLIENT_SECRET, and the error is raised with it in this frame.
@sensitive_variables("value")
def _refuse_user_settings(value: Any) -> NoReturn:
    if not isinstance(value, dict):
        raise BrexOAuthConfigurationError("BREX_OAUTH must be a dict.")
    unknown = sorted(set(value) - set(DEFAULTS))
    raise BrexOAuthConfigurationError(
        "Unknown BREX_OAUTH setting(s): {}. Known settings: {}.".format(
            ", ".join(unknown), ", ".join(sorted(DEFAULTS))
        )
    )


def team_model_setting() -> str | None:
    """The ``BREX_OAUTH_TEAM_MODEL`` setting (``"app_label.ModelName"``), or None: a
    top-level setting, like ``AUTH_USER_MODEL``, because it shapes the tables."""
    return getattr(settings, "BREX_OAUTH_TEAM_MODEL", None) or None
