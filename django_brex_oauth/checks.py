"""System checks that refuse a broken ``BREX_OAUTH`` configuration at start-up."""

from __future__ import annotations

from urllib.parse import urlsplit

from django.apps import apps
from django.conf import settings
from django.core.checks import Error, Tags, Warning, register
from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.utils.module_loading import import_string
from django.views.decorators.debug import sensitive_variables

from .conf import AUTH_BASE_URLS, REQUIRED_SCOPES, SETTINGS, brex_settings, team_model_setting
from .http import is_loopback_url
from .oauth import FORBIDDEN_ALGORITHMS
from .teams import TeamPolicy

# Brex's documented API scopes: read-write ones also come as ``<name>.readonly``; some
# exist only in their ``.readonly`` form; a few have their own read and write names.
_READ_WRITE_SCOPES = """users departments locations cards cards.pan legal_entities
    expenses.card budgets vendors transfers incoming_transfers travel.trips""".split()
_READ_ONLY_SCOPES = """companies transactions.card transactions.cash accounts.card
    accounts.cash statements.card statements.cash linked_accounts""".split()
_OTHER_SCOPES = "fields.read fields.write accounting.record.read accounting.record.write".split()

#: Every API scope name Brex documents.
KNOWN_SCOPES = frozenset(
    [*_READ_WRITE_SCOPES, *_OTHER_SCOPES]
    + [f"{name}.readonly" for name in (*_READ_WRITE_SCOPES, *_READ_ONLY_SCOPES)]
)


def _is_known_scope(scope: str) -> bool:
    return scope in KNOWN_SCOPES or scope in REQUIRED_SCOPES


def _url_problem(name: str, value: object) -> Error | None:
    parts = urlsplit(str(value))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return Error(
            f"BREX_OAUTH['{name}'] must be an absolute URL, not {value!r}.",
            hint="For example https://accounts-api.brex.com/oauth2/default.",
            id="brex_oauth.E007",
        )
    if parts.scheme == "http" and not is_loopback_url(str(value)):
        return Error(
            f"BREX_OAUTH['{name}'] uses plain http:// on a host that is not this machine.",
            hint="Use https://; plain http is allowed only for a local fake Brex on loopback.",
            id="brex_oauth.E008",
        )
    return None


def _callback_url_problems() -> list:
    """``REDIRECT_URI`` / ``SITE_URL``: one of them set, well formed, https without DEBUG."""
    redirect_uri, site_url = brex_settings.REDIRECT_URI, brex_settings.SITE_URL
    if not redirect_uri and not site_url:
        # Refused at connect time either way; in development a warning lets the site start.
        level, check_id = (Warning, "W004") if settings.DEBUG else (Error, "E010")
        return [
            level(
                "Neither BREX_OAUTH['SITE_URL'] nor BREX_OAUTH['REDIRECT_URI'] is set, so "
                "there is no callback URL to give Brex and connecting Brex is refused.",
                hint="Set SITE_URL to this site's public address, e.g. "
                "https://partner.example.com (the callback's path comes from your URLconf), "
                "or REDIRECT_URI to the exact callback URL registered with Brex. It is never "
                "taken from the request's Host header.",
                id=f"brex_oauth.{check_id}",
            )
        ]
    problems: list = []
    if site_url:
        parts = urlsplit(str(site_url))
        if (
            parts.scheme not in ("http", "https")
            or not parts.netloc
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
        ):
            problems.append(
                Error(
                    f"BREX_OAUTH['SITE_URL'] must be a scheme and host only, not {site_url!r}.",
                    hint="For example https://partner.example.com. For a callback URL that "
                    "is not this address plus the callback's path, set REDIRECT_URI instead.",
                    id="brex_oauth.E011",
                )
            )
    name, value = ("REDIRECT_URI", redirect_uri) if redirect_uri else ("SITE_URL", site_url)
    if urlsplit(str(value)).scheme != "https" and not settings.DEBUG:
        problems.append(
            Error(
                f"BREX_OAUTH['{name}'] must use https:// when DEBUG is off.",
                hint="Brex sends the authorization code to the callback URL; register the "
                "https:// callback URL with Brex and set it here.",
                id="brex_oauth.E006",
            )
        )
    return problems


@sensitive_variables("conf")  # the raw settings, CLIENT_SECRET included
def _credentials(conf: dict) -> list:
    """``CLIENT_ID`` and ``CLIENT_SECRET`` are set."""
    return [
        Error(
            f"BREX_OAUTH['{name}'] is not set.",
            hint="Brex developer support issues the client id and secret; set them "
            "from the environment (BREX_CLIENT_ID / BREX_CLIENT_SECRET).",
            id=f"brex_oauth.{check_id}",
        )
        for name, check_id in (("CLIENT_ID", "E001"), ("CLIENT_SECRET", "E002"))
        if not conf.get(name)
    ]


def _environment() -> list:
    """``ENVIRONMENT`` names one of Brex's environments."""
    if brex_settings.ENVIRONMENT in AUTH_BASE_URLS:
        return []
    return [
        Error(
            f"BREX_OAUTH['ENVIRONMENT'] is {brex_settings.ENVIRONMENT!r}.",
            hint="Use 'production' or 'staging'.",
            id="brex_oauth.E003",
        )
    ]


def _scopes() -> list:
    """``SCOPES`` is a list of names, asks for an API scope, and only for documented ones."""
    scopes = brex_settings.SCOPES
    if not isinstance(scopes, list | tuple) or not all(isinstance(s, str) for s in scopes):
        return [
            Error(
                "BREX_OAUTH['SCOPES'] must be a list of scope names.",
                hint='For example ["users.readonly", "companies.readonly"].',
                id="brex_oauth.E004",
            )
        ]
    problems: list = []
    if not [s for s in scopes if s not in REQUIRED_SCOPES]:
        problems.append(
            Error(
                "BREX_OAUTH['SCOPES'] asks for no Brex API scope.",
                hint="openid and offline_access are always requested; add the API scopes "
                'your site needs, such as "users.readonly" or "transactions.card.readonly".',
                id="brex_oauth.E005",
            )
        )
    unknown = [s for s in scopes if not _is_known_scope(s)]
    if unknown:
        problems.append(
            Warning(
                "BREX_OAUTH['SCOPES'] has scopes Brex does not document: " + ", ".join(unknown),
                hint="There are no bare accounts, transactions or payments scopes; see "
                "Brex's scopes page for the exact names.",
                id="brex_oauth.W002",
            )
        )
    return problems


def _brex_urls() -> list:
    """``ISSUER`` and ``API_BASE_URL``, when set, are absolute and https (or loopback)."""
    overrides = (("ISSUER", brex_settings.ISSUER), ("API_BASE_URL", brex_settings.API_BASE_URL))
    problems = [_url_problem(name, value) for name, value in overrides if value]
    return [problem for problem in problems if problem]


def _id_token_algorithms() -> list:
    """``ID_TOKEN_ALGORITHMS`` is a non-empty list of asymmetric algorithms."""
    algorithms = brex_settings.ID_TOKEN_ALGORITHMS
    if (
        isinstance(algorithms, list | tuple)
        and algorithms
        and all(isinstance(a, str) and a not in FORBIDDEN_ALGORITHMS for a in algorithms)
    ):
        return []
    return [
        Error(
            "BREX_OAUTH['ID_TOKEN_ALGORITHMS'] must be a list of asymmetric algorithms.",
            hint='Brex signs id_tokens with RS256; use ["RS256"]. "none" and HMAC '
            "algorithms are never accepted.",
            id="brex_oauth.E009",
        )
    ]


@sensitive_variables("conf")
def _declared_types(conf: dict) -> list:
    """Every setting declared with a type (a number, say) holds a value of that type."""
    problems = [
        setting.problem(conf[name]) for name, setting in SETTINGS.items() if name in conf
    ]
    return [
        Error(
            problem,
            hint="Set it as a number (a string of digits read from the environment is "
            "converted), or leave it out for the default.",
            id="brex_oauth.E012",
        )
        for problem in problems
        if problem
    ]


def _atomic_requests() -> list:
    """No database wraps requests in a transaction that could roll back a refresh."""
    atomic = sorted(
        alias for alias, db in connections.settings.items() if db.get("ATOMIC_REQUESTS")
    )
    if not atomic:
        return []
    return [
        Warning(
            "ATOMIC_REQUESTS is on for database(s) {}: a Brex token refreshed during a "
            "request is lost if that request's transaction rolls back.".format(", ".join(atomic)),
            hint="Brex rotates the refresh token on every refresh, so the new one must "
            "be committed at once. Decorate views that call BrexClient with "
            "django.db.transaction.non_atomic_requests, or silence this check "
            "(SILENCED_SYSTEM_CHECKS) if none does.",
            id="brex_oauth.W003",
        )
    ]


@sensitive_variables("conf", "key")
def _encryption_key(conf: dict) -> list:
    """Tokens are encrypted with a key of their own, not ``SECRET_KEY``."""
    key = conf.get("ENCRYPTION_KEY")
    if key and key != settings.SECRET_KEY:
        return []
    return [
        Warning(
            "Brex tokens are encrypted with a key derived from SECRET_KEY.",
            hint="Set BREX_OAUTH['ENCRYPTION_KEY'] to its own secret so rotating "
            "SECRET_KEY does not make stored tokens unreadable. Tokens already stored stay "
            "readable if you list the current SECRET_KEY in ENCRYPTION_KEY_FALLBACKS, then "
            "run manage.py brex_oauth_rotate_key.",
            id="brex_oauth.W001",
        )
    ]


@register(Tags.security, "brex_oauth")
@sensitive_variables("conf")  # the raw settings, CLIENT_SECRET included
def check_settings(app_configs=None, **kwargs):
    """Validate ``BREX_OAUTH``, one function per concern, in the order they are reported;
    none of them runs while the dict itself is refused (``brex_oauth.E000``)."""
    try:
        conf = brex_settings._user_settings()
    except ImproperlyConfigured as err:
        return [Error(str(err), id="brex_oauth.E000")]
    return [
        *_credentials(conf),
        *_environment(),
        *_scopes(),
        *_brex_urls(),
        *_callback_url_problems(),
        *_id_token_algorithms(),
        *_declared_types(conf),
        *_atomic_requests(),
        *_encryption_key(conf),
    ]


@register(Tags.security, "brex_oauth")
def check_webhook_settings(app_configs=None, **kwargs):
    """Validate the webhook settings: a subscription needs a receiver URL Brex accepts, and
    the secrets fetcher must be importable."""
    try:
        brex_settings._user_settings()
    except ImproperlyConfigured:
        return []  # reported by check_settings
    errors: list = []
    types = brex_settings.WEBHOOK_EVENT_TYPES
    url = brex_settings.WEBHOOK_URL
    if not isinstance(types, list | tuple) or not all(isinstance(t, str) for t in types):
        errors.append(Error(
            "BREX_OAUTH['WEBHOOK_EVENT_TYPES'] must be a list of event type names.",
            hint='For example ["USER_UPDATED", "EXPENSE_PAYMENT_UPDATED"].',
            id="brex_oauth.E020",
        ))
    elif types and not url:
        errors.append(Error(
            "BREX_OAUTH['WEBHOOK_EVENT_TYPES'] is set but WEBHOOK_URL is not.",
            hint="Set WEBHOOK_URL to the public https:// URL of the brex_oauth:webhook view.",
            id="brex_oauth.E020",
        ))
    elif types and "companies.readonly" not in (brex_settings.SCOPES or ()):
        errors.append(Warning(
            "BREX_OAUTH['WEBHOOK_EVENT_TYPES'] is set but SCOPES does not ask for "
            "companies.readonly.",
            hint="Webhook events reach the connections of their Brex company, which the app "
            "learns from GET /v2/company (companies.readonly); a connection without it "
            "hears no event that names a company.",
            id="brex_oauth.W020",
        ))
    if url:
        parts = urlsplit(str(url))
        if parts.scheme != "https" and not (parts.scheme == "http" and is_loopback_url(url)):
            errors.append(Error(
                "BREX_OAUTH['WEBHOOK_URL'] must be an absolute https:// URL.",
                hint="Brex delivers webhooks over HTTPS only; plain http is allowed only on "
                "loopback, for a local fake Brex.",
                id="brex_oauth.E021",
            ))
    fetcher = brex_settings.WEBHOOK_SECRETS_FETCHER
    if not callable(fetcher):
        try:
            import_string(str(fetcher))
        except ImportError:
            errors.append(Error(
                f"BREX_OAUTH['WEBHOOK_SECRETS_FETCHER'] = {fetcher!r} cannot be imported.",
                hint="Name a callable by its dotted path, or leave the default.",
                id="brex_oauth.E022",
            ))
    return errors


#: The methods a team policy must have (see django_brex_oauth.teams.TeamPolicy).
TEAM_POLICY_METHODS = (
    "connectable_teams", "can_connect", "visible_teams", "can_view", "can_reconnect",
    "can_disconnect",
    "can_refresh",
)


@register(Tags.security, "brex_oauth")
def check_team_settings(app_configs=None, **kwargs):
    """With ``BREX_OAUTH_TEAM_MODEL`` set: the model exists and the team policy is usable
    (importable, constructible, with every method the app asks; the default policy also
    needs the members relation)."""
    name = team_model_setting()
    if name is None:
        return []
    try:
        brex_settings._user_settings()
    except ImproperlyConfigured:
        return []  # reported by check_settings
    try:
        model = apps.get_model(name)
    except (ValueError, LookupError):
        return [Error(
            f"settings.BREX_OAUTH_TEAM_MODEL = {name!r} is not an installed model.",
            hint="Name the team model as 'app_label.ModelName', like AUTH_USER_MODEL.",
            id="brex_oauth.E030",
        )]
    path = brex_settings.TEAM_POLICY
    try:
        policy = import_string(str(path))()
    except Exception as err:  # noqa: BLE001 - any failure makes the policy unusable
        return [Error(
            f"BREX_OAUTH['TEAM_POLICY'] = {path!r} cannot be used: {type(err).__name__}.",
            hint="Name a class by its dotted path (a subclass of "
            "django_brex_oauth.teams.TeamPolicy), or leave the default.",
            id="brex_oauth.E031",
        )]
    missing = [m for m in TEAM_POLICY_METHODS if not callable(getattr(policy, m, None))]
    if missing:
        return [Error(
            f"BREX_OAUTH['TEAM_POLICY'] = {path!r} lacks {', '.join(missing)}.",
            hint="Subclass django_brex_oauth.teams.TeamPolicy.",
            id="brex_oauth.E031",
        )]
    if type(policy).member_teams is TeamPolicy.member_teams:
        attr = brex_settings.TEAM_MEMBERS_ATTR
        try:
            field = model._meta.get_field(attr)
        except Exception:  # noqa: BLE001 - FieldDoesNotExist, or a bad name
            field = None
        user_model = apps.get_model(settings.AUTH_USER_MODEL)
        if field is None or not field.many_to_many or field.related_model is not user_model:
            return [Error(
                f"The team policy reads members from {model.__name__}.{attr}, which is not a "
                "many-to-many relation to the user model.",
                hint="Set BREX_OAUTH['TEAM_MEMBERS_ATTR'] to the team model's members "
                "relation, or name your own policy in BREX_OAUTH['TEAM_POLICY'].",
                id="brex_oauth.E032",
            )]
    return []
