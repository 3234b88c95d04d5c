"""The protocol layer: the only code that speaks OAuth 2.0 / OpenID Connect to Brex.

Plain arguments in, plain data out: no ORM, no ``HttpRequest``. Endpoints come from
discovery; oauthlib builds the token requests, with the client credentials in the form body
(``client_secret_post``, as Brex documents), and every request goes through the process's
one HTTP session (:mod:`django_brex_oauth.http`).

Every function here that holds a token, a code, a verifier or the client secret is marked
``@sensitive_variables()`` with no names: Django's error reports (and the trackers that use
its filter) then show none of the locals of that function or of anything it calls, where
requests and oauthlib hold the same values under names of their own (``data``, ``body``).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import math
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, cast
from urllib.parse import urlencode

import requests
from django.views.decorators.debug import sensitive_variables
from oauthlib.oauth2 import (
    BackendApplicationClient,
    Client,
    OAuth2Error,
    WebApplicationClient,
)

from . import discovery
from .conf import REQUIRED_SCOPES, brex_settings
from .exceptions import (
    BrexOAuthConfigurationError,
    BrexOAuthError,
    BrexUnavailable,
    InvalidClient,
    InvalidGrant,
    IssuerMismatch,
    MalformedTokenResponse,
    TokenError,
)
from .http import (
    NOT_JSON,
    check_token_transport,
    is_transient_status,
    json_body,
    outage,
    send,
)

# The id_token checks have a module of their own; callers find them here too.
from .id_token import FORBIDDEN_ALGORITHMS as FORBIDDEN_ALGORITHMS
from .id_token import access_token_hash as access_token_hash
from .id_token import validate_id_token as validate_id_token
from .id_token import validate_refreshed_tokens as validate_refreshed_tokens

#: Token endpoint errors that refuse this site's client rather than one customer's grant:
#: a wrong client id or secret, or a client Brex does not allow to use the grant.
CLIENT_REJECTED_ERRORS = frozenset({"invalid_client", "unauthorized_client"})

logger = logging.getLogger("django_brex_oauth")


# Values for one authorization request ------------------------------------------------------


def new_state() -> str:
    """An unguessable ``state`` (32 random bytes, URL-safe; Brex wants more than 8 chars)."""
    return secrets.token_urlsafe(32)


def new_nonce() -> str:
    return secrets.token_urlsafe(32)


def new_code_verifier() -> str:
    """A PKCE verifier: 64 URL-safe characters (RFC 7636 allows 43 to 128)."""
    return secrets.token_urlsafe(48)


@sensitive_variables()
def code_challenge(verifier: str) -> str:
    """The S256 PKCE challenge for ``verifier``."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@sensitive_variables()
def build_authorization_url(
    *,
    redirect_uri: str,
    scopes: list[str],
    state: str,
    code_verifier: str,
    nonce: str,
    prompt_login: bool = False,
) -> str:
    """The URL of Brex's authorization endpoint for one authorization request."""
    params = {
        "client_id": brex_settings.CLIENT_ID,
        "response_type": "code",
        "redirect_uri": redirect_uri,
        "scope": " ".join(scopes),
        "state": state,
        "nonce": nonce,
        "code_challenge": code_challenge(code_verifier),
        "code_challenge_method": "S256",
    }
    if prompt_login:
        params["prompt"] = "login"
    endpoint = discovery.get_endpoint("authorization_endpoint")
    separator = "&" if "?" in endpoint else "?"
    return endpoint + separator + urlencode(params)


# Token endpoint ----------------------------------------------------------------------------


#: The longest access-token lifetime believed from a token answer: one day. Brex's access
#: tokens last an hour; a larger ``expires_in`` (``10**12``, say) is cut down to this, so a
#: wrong answer delays a refresh by a day at most instead of overflowing a date or never
#: refreshing again (the API client still refreshes on a 401).
MAX_ACCESS_TOKEN_LIFETIME = 24 * 3600

#: Longest token accepted, in characters (Okta's JWT access tokens are about 1,000).
MAX_TOKEN_LENGTH = 16384

# RFC 6750 b64token: what can follow "Bearer " in a header.
_ACCESS_TOKEN_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# RFC 6749 appendix A: a refresh token is visible ASCII (no spaces, so it survives a form).
_REFRESH_TOKEN_RE = re.compile(r"[\x21-\x7e]+")
_SCOPE_TOKEN_RE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


@sensitive_variables()
def _check_token(
    value: Any, name: str, pattern: re.Pattern[str], problems: list[str]
) -> str | None:
    """``value`` when it is a token by ``pattern``, else None with the reason in
    ``problems`` (which names the field and the JSON type, never the value)."""
    if not isinstance(value, str):
        problems.append(f"{name} is {_json_type(value)}, not a string")
    elif not value:
        problems.append(f"{name} is empty")
    elif len(value) > MAX_TOKEN_LENGTH:
        problems.append(f"{name} is longer than {MAX_TOKEN_LENGTH} characters")
    elif not pattern.fullmatch(value):
        problems.append(f"{name} holds characters a token cannot have")
    else:
        return value
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "not JSON"


def _expires_in(value: Any, problems: list[str]) -> int:
    """Seconds the access token lasts: ``DEFAULT_ACCESS_TOKEN_LIFETIME`` when Brex leaves it
    out, at most :data:`MAX_ACCESS_TOKEN_LIFETIME`."""
    if value is None:
        return brex_settings.DEFAULT_ACCESS_TOKEN_LIFETIME
    seconds: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        seconds = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        seconds = int(value.strip())
    if seconds is None:
        problems.append(f"expires_in is {_json_type(value)}, not a whole number of seconds")
        return 0
    if seconds <= 0:
        problems.append("expires_in is not a positive number of seconds")
        return 0
    return min(seconds, MAX_ACCESS_TOKEN_LIFETIME)


def _scopes(value: Any, requested: Sequence[str] | None, problems: list[str]) -> list[str]:
    if value is None:
        # RFC 6749 3.3 and 6: no scope in the answer means what was asked for (on a
        # refresh: what was granted before) was granted.
        return list(requested or [])
    items = value.split() if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(
        isinstance(item, str) and _SCOPE_TOKEN_RE.fullmatch(item) for item in items
    ):
        problems.append("scope is not a list of scopes")
        return list(requested or [])
    return list(dict.fromkeys(items))


def _received_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class TokenResponse:
    """What the token endpoint answered, checked. ``repr`` never shows a token.

    Every field holds a checked value or nothing: ``access_token`` and ``refresh_token`` are
    tokens by RFC 6749/6750's grammar (or None), ``token_type`` is ``Bearer``, ``expires_in``
    a positive whole number of seconds, at most :data:`MAX_ACCESS_TOKEN_LIFETIME`.
    ``problems`` says, in words that never quote a value, what was wrong with the answer;
    when it is not empty the answer as a whole must not be used, but a ``refresh_token``
    in it is still a token Brex issued (see :func:`refresh`).

    ``received_at`` is when the answer arrived: expiries count from then, not from when
    whatever came after (identity calls, a retried database write) was done.
    """

    access_token: str | None = field(repr=False)
    token_type: str
    expires_in: int
    scopes: list[str]
    refresh_token: str | None = field(default=None, repr=False)
    id_token: str | None = field(default=None, repr=False)
    received_at: datetime = field(default_factory=_received_now)
    problems: tuple[str, ...] = ()

    @property
    def expires_at(self) -> datetime:
        """When the access token expires, counted from when the answer arrived."""
        return self.received_at + timedelta(seconds=self.expires_in)

    def raise_for_problems(self) -> None:
        """Raise :class:`MalformedTokenResponse` when the answer must not be used."""
        if self.problems:
            raise MalformedTokenResponse(self.problems)

    def usable_access_token(self) -> str:
        """The access token of an answer that may be used; :meth:`raise_for_problems`
        otherwise (:meth:`from_dict` keeps an access token exactly when it found no
        problem)."""
        self.raise_for_problems()
        if self.access_token is None:
            raise MalformedTokenResponse(["access_token is missing"])
        return self.access_token

    @classmethod
    @sensitive_variables()
    def from_dict(
        cls,
        token: Any,
        *,
        requested_scopes: Sequence[str] | None = None,
        received_at: datetime | None = None,
    ) -> TokenResponse:
        """Check a decoded token answer (any JSON value) and keep only what is sound."""
        received_at = received_at or _received_now()
        problems: list[str] = []
        if not isinstance(token, dict):
            problems.append(f"the answer is {_json_type(token)}, not a JSON object")
            return cls(None, "Bearer", 0, list(requested_scopes or []),
                       received_at=received_at, problems=tuple(problems))
        access_token = _check_token(
            token.get("access_token"), "access_token", _ACCESS_TOKEN_RE, problems
        )
        token_type = token.get("token_type")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            # RFC 6749 5.1: required; this app can only send Bearer tokens.
            problems.append(
                "token_type is missing" if token_type is None else "token_type is not Bearer"
            )
        expires_in = _expires_in(token.get("expires_in"), problems)
        scopes = _scopes(token.get("scope"), requested_scopes, problems)
        refresh_token = None
        if token.get("refresh_token") is not None:
            refresh_token = _check_token(
                token["refresh_token"], "refresh_token", _REFRESH_TOKEN_RE, problems
            )
        id_token = token.get("id_token")
        if id_token is not None and not isinstance(id_token, str):
            problems.append(f"id_token is {_json_type(id_token)}, not a string")
            id_token = None
        return cls(
            access_token=None if problems else access_token,
            token_type="Bearer",
            expires_in=expires_in,
            scopes=scopes,
            refresh_token=refresh_token,
            id_token=id_token or None,
            received_at=received_at,
            problems=tuple(problems),
        )


def _token_error(err: OAuth2Error) -> TokenError:
    error = getattr(err, "error", "") or "invalid_request"
    description = getattr(err, "description", "") or ""
    status = getattr(err, "status_code", None)
    if error == "invalid_grant":
        return InvalidGrant(error, description, status)
    if error in CLIENT_REJECTED_ERRORS:
        return InvalidClient(error, description, status)
    return TokenError(error, description, status)


def _not_json(response: requests.Response) -> BrexUnavailable:
    # A proxy's or a maintenance page, not Brex's answer: worth trying again later (oauthlib
    # would report it as a missing token, as if Brex had answered 400).
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
    return BrexUnavailable(
        "Brex token endpoint answered HTTP 200 with a page that is not JSON"
        + (f" ({content_type})" if content_type else ""),
        status=200,
    )


@sensitive_variables()
def _read_token_answer(response: requests.Response, client: Client) -> Any:
    """The decoded body of a successful token answer (any JSON value but an error), read
    here rather than by oauthlib: oauthlib loses a rotated refresh token when anything else
    in the answer is wrong, and stores ``null`` as the string "None". Anything else is
    raised: :class:`BrexUnavailable` for 429, 5xx or a 200 that is not JSON, and the
    :class:`TokenError` oauthlib makes of an OAuth error."""
    status = response.status_code
    # 429 and 5xx bodies are not token responses; oauthlib would misreport them.
    if is_transient_status(status):
        raise outage("Brex token endpoint", response)
    body = json_body(response)
    is_error = isinstance(body, dict) and "error" in body
    if status >= 400 and not is_error:
        raise TokenError("invalid_response", "", status=status)
    if status == 200 and body is NOT_JSON:
        raise _not_json(response)
    if 200 <= status < 300 and not is_error:
        return body
    try:
        client.parse_request_body_response(response.text)
    except OAuth2Error as err:
        raise _token_error(err) from None
    except Warning as err:  # oauthlib's "scope has changed" and similar
        raise TokenError("invalid_response", str(err)) from None
    # oauthlib accepted an answer that is not one (a 3xx, say): nothing usable arrived.
    raise TokenError("invalid_response", "the token endpoint sent no answer to read")


@sensitive_variables()
def _call_token_endpoint(
    client: Client, prepare_body: Callable[[], str], issuer: str | None = None
) -> tuple[Any, datetime]:
    """Send the token request whose form body ``prepare_body()`` builds with ``client``
    (oauthlib) through the process's HTTP session, once
    :func:`~.http.check_token_transport` allows the endpoint; the decoded answer (any JSON
    value) and when it arrived."""
    token_url = discovery.get_endpoint("token_endpoint", issuer=issuer)
    try:
        check_token_transport(token_url)
        body = prepare_body()
    except OAuth2Error as err:
        raise _token_error(err) from None
    response = send(
        "POST", token_url, data=body, headers=_TOKEN_REQUEST_HEADERS,
        on_unreachable=lambda: discovery.invalidate(issuer),
    )
    received_at = _received_now()
    return _read_token_answer(response, client), received_at


_ACCEPT_JSON = {"Accept": "application/json"}
#: The token request's form body, as oauthlib encodes it, and Accept.
_TOKEN_REQUEST_HEADERS = {
    "Content-Type": "application/x-www-form-urlencoded;charset=UTF-8", **_ACCEPT_JSON
}


def _client_id() -> str:
    # May be unset (None), which check brex_oauth.E001 refuses at start-up; oauthlib then
    # leaves client_id out of the form, as it always has.
    return cast(str, brex_settings.CLIENT_ID)


@sensitive_variables()
def exchange_code(
    *, code: str, redirect_uri: str, code_verifier: str, granted_scopes: list[str] | None = None
) -> TokenResponse:
    """Exchange an authorization code (with its PKCE verifier) for tokens.

    ``granted_scopes`` is what the answer's scopes are taken to be when it names none (Brex's
    documented token response has no ``scope``): the callback's ``scope``, or else the
    scopes that were requested.

    A malformed answer is returned with its ``problems``, not raised, so that the caller
    can revoke what Brex issued before raising it (``raise_for_problems()``).
    """
    client = WebApplicationClient(_client_id())
    body, received_at = _call_token_endpoint(
        client,
        lambda: client.prepare_request_body(
            code=code,
            redirect_uri=redirect_uri,
            code_verifier=code_verifier,
            client_secret=brex_settings.CLIENT_SECRET,
            include_client_id=True,
        ),
    )
    return TokenResponse.from_dict(
        body, requested_scopes=granted_scopes, received_at=received_at
    )


@sensitive_variables()
def refresh(refresh_token: str, *, issuer: str | None = None) -> TokenResponse:
    """Trade a refresh token for new tokens at ``issuer`` (the configured one by default).

    ``refresh_token`` of the answer is None when Brex did not rotate it (keep the old one);
    ``scopes`` is empty when the answer names none (the grant is unchanged). A malformed
    answer is returned with its ``problems``, not raised:
    Brex may have rotated the refresh token anyway, and the new one (``refresh_token``, when
    it is a token) is then the only one that will keep working.
    """
    client = WebApplicationClient(_client_id())
    body, received_at = _call_token_endpoint(
        client,
        lambda: client.prepare_refresh_body(
            refresh_token=refresh_token,
            client_id=brex_settings.CLIENT_ID,
            client_secret=brex_settings.CLIENT_SECRET,
        ),
        issuer,
    )
    answer = TokenResponse.from_dict(body, received_at=received_at)
    if answer.refresh_token == refresh_token:
        # The same token sent back: not rotated.
        answer = dataclasses.replace(answer, refresh_token=None)
    return answer


@sensitive_variables()
def verify_client_credentials(*, issuer: str | None = None) -> None:
    """Find out whether the token endpoint of ``issuer`` (the configured one by default)
    accepts ``CLIENT_ID`` and ``CLIENT_SECRET``, without issuing or changing anything at
    Brex.

    It asks to refresh a token that cannot exist: a server that accepts the client answers
    ``invalid_grant``; one that does not answers ``invalid_client`` (raised as
    :class:`InvalidClient`). Any other refusal is raised as the :class:`TokenError` it is.
    """
    try:
        refresh("brex-oauth-check-" + secrets.token_urlsafe(24), issuer=issuer)
    except InvalidGrant:
        return
    raise TokenError(
        "unexpected_response", "the token endpoint accepted a refresh token that does not exist"
    )


@sensitive_variables()
def client_credentials(scopes: list[str]) -> TokenResponse:
    """A client-credentials token (the onboarding API) for ``scopes``."""
    client = BackendApplicationClient(_client_id())
    body, received_at = _call_token_endpoint(
        client,
        lambda: client.prepare_request_body(
            scope=" ".join(scopes),
            client_secret=brex_settings.CLIENT_SECRET,
            include_client_id=True,
        ),
    )
    answer = TokenResponse.from_dict(body, requested_scopes=scopes, received_at=received_at)
    answer.raise_for_problems()
    return answer


@sensitive_variables()
def revoke(
    token: str, token_type_hint: str = "refresh_token", *, issuer: str | None = None
) -> None:
    """Revoke ``token`` at the discovery ``revocation_endpoint`` of ``issuer`` (the
    configured one by default; RFC 7009, form-encoded).

    Raises :class:`BrexUnavailable` when Brex cannot be reached or answers 429/5xx,
    and :class:`TokenError` when it refuses the request (e.g. ``invalid_client``).
    """
    url = discovery.get_endpoint("revocation_endpoint", issuer=issuer)
    data = {
        "token": token,
        "token_type_hint": token_type_hint,
        "client_id": brex_settings.CLIENT_ID,
        "client_secret": brex_settings.CLIENT_SECRET,
    }
    response = send(
        "POST", url, data=data, headers=_ACCEPT_JSON,
        on_unreachable=lambda: discovery.invalidate(issuer),
    )
    if response.status_code == 200:
        return
    if is_transient_status(response.status_code):
        raise outage("Brex revocation endpoint", response)
    body = json_body(response)
    if isinstance(body, dict):
        error = str(body.get("error") or "invalid_request")
        description = str(body.get("error_description") or "")
    else:
        error = description = ""
    if error in CLIENT_REJECTED_ERRORS:
        raise InvalidClient(error, description, response.status_code)
    raise TokenError(error, description, response.status_code)


@sensitive_variables()
def revoke_quietly(token: str | None, hint: str, *, issuer: str | None = None) -> None:
    """Best-effort :func:`revoke` of a token this site will not keep (at ``issuer``, the
    configured one by default): a failure is logged, never raised."""
    if not token:
        return
    try:
        revoke(token, hint, issuer=issuer)
    except BrexOAuthError as err:
        logger.warning("Could not revoke an unused Brex token: %s", err)


# Authorization response ----------------------------------------------------------------------


def check_authorization_response_issuer(iss: str | None) -> None:
    """The mix-up defence of RFC 9207 for the redirect back from the authorization server.

    ``iss`` is the response's ``iss`` parameter, ``None`` when it has none. When present it
    must equal the discovered issuer exactly; when absent, the issuer must not advertise
    ``authorization_response_iss_parameter_supported: true`` (it would then always send it).
    Otherwise the answer may come from another authorization server the person was steered
    to, and :class:`IssuerMismatch` is raised before anything is exchanged.
    """
    metadata = discovery.get_provider_metadata()
    expected = str(metadata["issuer"])
    if iss is None:
        if metadata.get("authorization_response_iss_parameter_supported") is True:
            raise IssuerMismatch(
                "The authorization response has no iss, although the issuer advertises "
                "authorization_response_iss_parameter_supported."
            )
        return
    if iss != expected:
        raise IssuerMismatch(
            f"The authorization response names issuer {iss[:200]!r}, not {expected!r}."
        )


def required_scopes_only(scopes: list[str]) -> bool:
    """True when ``scopes`` holds nothing beyond ``openid`` and ``offline_access``."""
    return not [s for s in scopes if s not in REQUIRED_SCOPES]


def required_api_scopes() -> list[str]:
    """``REQUIRED_API_SCOPES``, checked: a string would require each of its letters and so
    mark every connection ``needs_reauth``, so it raises
    :class:`BrexOAuthConfigurationError` instead."""
    required = brex_settings.REQUIRED_API_SCOPES or ()
    if not isinstance(required, list | tuple) or not all(isinstance(s, str) for s in required):
        raise BrexOAuthConfigurationError(
            "BREX_OAUTH['REQUIRED_API_SCOPES'] must be a list of scope names."
        )
    return list(required)


def missing_required_scopes(scopes: Sequence[str]) -> list[str]:
    """The scopes of ``REQUIRED_API_SCOPES`` that ``scopes`` does not hold (a scope holds its
    ``.readonly`` variant too: ``users`` holds ``users.readonly``)."""
    granted = set(scopes)
    return [
        scope
        for scope in required_api_scopes()
        if scope not in granted
        and not (scope.endswith(".readonly") and scope.removesuffix(".readonly") in granted)
    ]
