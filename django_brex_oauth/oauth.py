"""The protocol layer: the only code that speaks OAuth 2.0 / OpenID Connect to Brex.

Plain arguments in, plain data out: no ORM, no ``HttpRequest``. Endpoints come from
discovery; token requests go through requests-oauthlib with the client credentials
in the form body (``client_secret_post``, as Brex documents).

Every function here that holds a token, a code, a verifier or the client secret is marked
``@sensitive_variables()`` with no names: Django's error reports (and the trackers that use
its filter) then show none of the locals of that function or of anything it calls, where
requests and oauthlib hold the same values under names of their own (``data``, ``body``).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import jwt
import requests
from django.views.decorators.debug import sensitive_variables
from oauthlib.oauth2 import OAuth2Error
from requests_oauthlib import OAuth2Session

from . import discovery
from .conf import REQUIRED_SCOPES, brex_settings
from .exceptions import (
    BrexUnavailable,
    DiscoveryError,
    IdTokenError,
    InvalidClient,
    InvalidGrant,
    IssuerMismatch,
    RefreshIdTokenError,
    TokenError,
)
from .http import USER_AGENT, allow_insecure_loopback, silence_secret_logging, unavailable

#: Algorithms that can never sign an id_token we accept, whatever the settings say.
FORBIDDEN_ALGORITHMS = frozenset({"none", "HS256", "HS384", "HS512"})


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


@dataclass(frozen=True)
class TokenResponse:
    """What the token endpoint answered. ``repr`` never shows a token."""

    access_token: str = field(repr=False)
    token_type: str
    expires_in: int
    scopes: list[str]
    refresh_token: str | None = field(default=None, repr=False)
    id_token: str | None = field(default=None, repr=False)

    @classmethod
    @sensitive_variables()
    def from_dict(cls, token: dict[str, Any], *, requested_scopes: list[str] | None = None):
        scope = token.get("scope")
        if isinstance(scope, str):
            scopes = scope.split()
        elif isinstance(scope, list | tuple):
            scopes = [str(s) for s in scope]
        else:
            # RFC 6749 3.3: no scope in the answer means what was asked for was granted.
            scopes = list(requested_scopes or [])
        try:
            expires_in = int(token.get("expires_in") or 0)
        except (TypeError, ValueError):
            expires_in = 0
        return cls(
            access_token=str(token["access_token"]),
            token_type=str(token.get("token_type") or "Bearer"),
            expires_in=expires_in or int(brex_settings.DEFAULT_ACCESS_TOKEN_LIFETIME),
            scopes=scopes,
            refresh_token=token.get("refresh_token") or None,
            id_token=token.get("id_token") or None,
        )


class _BrexOAuth2Session(OAuth2Session):
    """requests-oauthlib's session with our timeout, User-Agent and error mapping."""

    def __init__(self, **kwargs: Any) -> None:
        silence_secret_logging()
        super().__init__(client_id=brex_settings.CLIENT_ID, **kwargs)
        self.headers["User-Agent"] = USER_AGENT
        self.register_compliance_hook("access_token_response", _raise_for_outage)
        self.register_compliance_hook("refresh_token_response", _raise_for_outage)

    @sensitive_variables()
    def request(self, method, url, *args, **kwargs):  # type: ignore[override]
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = float(brex_settings.HTTP_TIMEOUT)
        return super().request(method, url, *args, **kwargs)


def _raise_for_outage(response: requests.Response) -> requests.Response:
    # 429 and 5xx bodies are not token responses; oauthlib would misreport them.
    if response.status_code == 429 or response.status_code >= 500:
        raise BrexUnavailable(
            f"Brex token endpoint answered HTTP {response.status_code}",
            status=response.status_code,
        )
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or "error" not in body:
            raise TokenError("invalid_response", "", status=response.status_code)
    elif response.status_code == 200:
        try:
            response.json()
        except ValueError:
            # A proxy's or a maintenance page, not Brex's answer: worth trying again later
            # (oauthlib would report it as a missing token, as if Brex had answered 400).
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
            raise BrexUnavailable(
                "Brex token endpoint answered HTTP 200 with a page that is not JSON"
                + (f" ({content_type})" if content_type else ""),
                status=200,
            ) from None
    return response


def _token_error(err: OAuth2Error) -> TokenError:
    error = getattr(err, "error", "") or "invalid_request"
    description = getattr(err, "description", "") or ""
    status = getattr(err, "status_code", None)
    if error == "invalid_grant":
        return InvalidGrant(error, description, status)
    if error == "invalid_client":
        return InvalidClient(error, description, status)
    return TokenError(error, description, status)


@sensitive_variables()
def _call_token_endpoint(call, issuer: str | None = None) -> dict[str, Any]:
    token_url = discovery.get_endpoint("token_endpoint", issuer=issuer)
    try:
        with allow_insecure_loopback(token_url):
            return dict(call(token_url))
    except OAuth2Error as err:
        raise _token_error(err) from None
    except Warning as err:  # oauthlib's "scope has changed" and similar
        raise TokenError("invalid_response", str(err)) from None
    except requests.RequestException as err:
        discovery.invalidate(issuer)
        raise unavailable(err) from err


@sensitive_variables()
def exchange_code(
    *, code: str, redirect_uri: str, code_verifier: str, granted_scopes: list[str] | None = None
) -> TokenResponse:
    """Exchange an authorization code (with its PKCE verifier) for tokens.

    ``granted_scopes`` is what the answer's scopes are taken to be when it names none (Brex's
    documented token response has no ``scope``): the callback's ``scope``, or else the
    scopes that were requested.
    """
    session = _BrexOAuth2Session(redirect_uri=redirect_uri)
    token = _call_token_endpoint(
        lambda url: session.fetch_token(
            url,
            code=code,
            code_verifier=code_verifier,
            client_secret=brex_settings.CLIENT_SECRET,
            include_client_id=True,
        )
    )
    return TokenResponse.from_dict(token, requested_scopes=granted_scopes)


@sensitive_variables()
def refresh(refresh_token: str, *, issuer: str | None = None) -> TokenResponse:
    """Trade a refresh token for new tokens at ``issuer`` (the configured one by default).
    ``refresh_token`` of the answer is None when Brex did not rotate it (keep the old one)."""
    session = _BrexOAuth2Session()
    token = _call_token_endpoint(
        lambda url: session.refresh_token(
            url,
            refresh_token=refresh_token,
            client_id=brex_settings.CLIENT_ID,
            client_secret=brex_settings.CLIENT_SECRET,
        ),
        issuer,
    )
    if token.get("refresh_token") == refresh_token:
        # requests-oauthlib copies the old token in when none came back.
        token["refresh_token"] = None
    return TokenResponse.from_dict(token)


@sensitive_variables()
def verify_client_credentials() -> None:
    """Find out whether the token endpoint accepts ``CLIENT_ID`` and ``CLIENT_SECRET``,
    without issuing or changing anything at Brex.

    It asks to refresh a token that cannot exist: a server that accepts the client answers
    ``invalid_grant``; one that does not answers ``invalid_client`` (raised as
    :class:`InvalidClient`). Any other refusal is raised as the :class:`TokenError` it is.
    """
    try:
        refresh("brex-oauth-check-" + secrets.token_urlsafe(24))
    except InvalidGrant:
        return
    raise TokenError(
        "unexpected_response", "the token endpoint accepted a refresh token that does not exist"
    )


@sensitive_variables()
def client_credentials(scopes: list[str]) -> TokenResponse:
    """A client-credentials token (the onboarding API) for ``scopes``."""
    from oauthlib.oauth2 import BackendApplicationClient

    session = _BrexOAuth2Session(client=BackendApplicationClient(brex_settings.CLIENT_ID))
    token = _call_token_endpoint(
        lambda url: session.fetch_token(
            url,
            scope=scopes,
            client_secret=brex_settings.CLIENT_SECRET,
            include_client_id=True,
        )
    )
    return TokenResponse.from_dict(token, requested_scopes=scopes)


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
    from .http import new_session

    try:
        response = new_session().post(url, data=data, headers={"Accept": "application/json"})
    except requests.RequestException as err:
        discovery.invalidate(issuer)
        raise unavailable(err) from err
    if response.status_code == 200:
        return
    if response.status_code == 429 or response.status_code >= 500:
        raise BrexUnavailable(
            f"Brex revocation endpoint answered HTTP {response.status_code}",
            status=response.status_code,
        )
    try:
        body = response.json()
    except ValueError:
        body = {}
    error = str(body.get("error") or "invalid_request") if isinstance(body, dict) else ""
    description = str(body.get("error_description") or "") if isinstance(body, dict) else ""
    if error == "invalid_client":
        raise InvalidClient(error, description, response.status_code)
    raise TokenError(error, description, response.status_code)


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


# id_token ------------------------------------------------------------------------------------

#: The hash of each ``alg`` family for ``at_hash``: the one its signature uses.
_AT_HASH_FUNCTIONS = {"256": hashlib.sha256, "384": hashlib.sha384, "512": hashlib.sha512}


def _allowed_algorithms() -> list[str]:
    return [a for a in brex_settings.ID_TOKEN_ALGORITHMS if a not in FORBIDDEN_ALGORITHMS]


@sensitive_variables()
def access_token_hash(access_token: str, alg: str) -> str:
    """The ``at_hash`` of ``access_token`` for an id_token signed with ``alg`` (OpenID Connect
    Core 3.1.3.6): the left half of its hash by ``alg``'s hash function, base64url."""
    hash_function = _AT_HASH_FUNCTIONS.get(alg[-3:]) if alg[:2] in ("RS", "PS", "ES") else None
    if hash_function is None:
        raise IdTokenError(f"The id_token's at_hash cannot be checked for algorithm {alg!r}.")
    digest = hash_function(access_token.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest[: len(digest) // 2]).rstrip(b"=").decode("ascii")


def _check_audience(claims: dict[str, Any]) -> None:
    # Policy: an id_token is for this site alone. PyJWT accepts an ``aud`` list that merely
    # contains the client id; a token also meant for another party could be replayed by it.
    client_id = brex_settings.CLIENT_ID
    audience = claims["aud"]
    audiences = [audience] if isinstance(audience, str) else audience
    if not isinstance(audiences, list) or not audiences:
        raise IdTokenError("The id_token's aud is not a client id or a list of them.")
    if any(entry != client_id for entry in audiences):
        raise IdTokenError("The id_token is also meant for an audience other than this client.")
    azp = claims.get("azp")
    if len(audiences) > 1 and azp is None:
        raise IdTokenError("The id_token has several audiences but no azp.")
    if azp is not None and azp != client_id:
        raise IdTokenError("The id_token's azp is not this client.")


def _check_issued_at(claims: dict[str, Any]) -> None:
    issued_at = claims["iat"]
    if isinstance(issued_at, bool) or not isinstance(issued_at, int | float):
        raise IdTokenError("The id_token's iat is not a number.")
    leeway = int(brex_settings.ID_TOKEN_LEEWAY)
    now = time.time()
    if issued_at > now + leeway:
        raise IdTokenError("The id_token was issued in the future.")
    max_age = int(brex_settings.ID_TOKEN_MAX_AGE)
    if issued_at < now - max_age - leeway:
        raise IdTokenError(
            f"The id_token was issued {int(now - issued_at)} seconds ago, more than "
            f"ID_TOKEN_MAX_AGE ({max_age}) allows."
        )


@sensitive_variables()
def _check_access_token_hash(claims: dict[str, Any], alg: str, access_token: str | None) -> None:
    claimed = claims.get("at_hash")
    if claimed is None or access_token is None:
        return
    expected = access_token_hash(access_token, alg)
    if not isinstance(claimed, str) or not secrets.compare_digest(
        claimed.encode("utf-8"), expected.encode("ascii")
    ):
        raise IdTokenError("The id_token's at_hash does not match the access token.")


@sensitive_variables()
def _verified_claims(
    id_token: str, *, access_token: str | None, issuer: str | None = None
) -> dict[str, Any]:
    """The claims of an id_token of ``issuer`` (the configured one by default) that passes
    every check but the ``nonce`` and ``sub`` (OpenID Connect Core 3.1.3.7 and 12.2); raises
    :class:`IdTokenError`, or :class:`DiscoveryError` when the issuer's document or keys
    cannot be read."""
    algorithms = _allowed_algorithms()
    try:
        header = jwt.get_unverified_header(id_token)
    except jwt.InvalidTokenError as err:
        raise IdTokenError(f"The id_token is malformed: {type(err).__name__}") from None
    alg = header.get("alg")
    if alg not in algorithms:
        raise IdTokenError(f"The id_token algorithm {alg!r} is not allowed.")
    jwk = discovery.find_jwk(header.get("kid"), issuer=issuer)
    if jwk is None:
        raise IdTokenError("The id_token was signed with a key the issuer does not publish.")
    try:
        key = jwt.PyJWK(jwk, algorithm=alg)
    except jwt.PyJWKError as err:
        raise IdTokenError(f"The issuer's signing key is unusable: {err}") from None
    try:
        claims = jwt.decode(
            id_token,
            key=key,
            algorithms=[alg],
            audience=brex_settings.CLIENT_ID,
            issuer=discovery.discovered_issuer(issuer),
            leeway=int(brex_settings.ID_TOKEN_LEEWAY),
            options={"require": ["iss", "sub", "aud", "exp", "iat"]},
        )
    except jwt.InvalidTokenError as err:
        raise IdTokenError(f"The id_token is invalid: {type(err).__name__}: {err}") from None
    _check_audience(claims)
    _check_issued_at(claims)
    _check_access_token_hash(claims, alg, access_token)
    return claims


@sensitive_variables()
def validate_id_token(
    id_token: str, *, nonce: str, access_token: str | None = None
) -> dict[str, Any]:
    """Check the id_token of a sign-in (OpenID Connect Core 3.1.3.7) and return its claims.

    Checks the signature against the issuer's JWKS (fetching it again once for an unknown
    ``kid``), the algorithm against the allow-list (never ``none`` or an HMAC), ``iss``
    (exactly the discovered issuer), ``aud`` (this client and no other) and ``azp``, ``exp``,
    ``iat`` (neither in the future nor older than ``ID_TOKEN_MAX_AGE``), ``nonce``, and, with
    ``access_token``, the ``at_hash`` when the token carries one.
    """
    try:
        claims = _verified_claims(id_token, access_token=access_token)
    except DiscoveryError as err:
        raise IdTokenError(f"The issuer's signing keys are unavailable: {err}") from err
    claimed_nonce = claims.get("nonce")
    if not isinstance(claimed_nonce, str) or not secrets.compare_digest(claimed_nonce, nonce):
        raise IdTokenError("The id_token nonce does not match this authorization request.")
    return claims


@sensitive_variables()
def validate_refreshed_tokens(
    tokens: TokenResponse, *, subject: str, issuer: str | None = None
) -> None:
    """Check the id_token of a refresh answer, if it has one (OpenID Connect Core 12.2).

    The same checks as at sign-in against ``issuer`` (the connection's; the configured one
    by default), but no ``nonce``, and its ``sub`` must be ``subject``, the Brex user the
    connection belongs to. Raises :class:`RefreshIdTokenError` (a
    :class:`TokenError`) so the refresh fails and stores none of ``tokens``; an issuer whose
    document or keys cannot be read raises :class:`DiscoveryError` (try again later).
    """
    if not tokens.id_token:
        return
    try:
        claims = _verified_claims(tokens.id_token, access_token=tokens.access_token,
                                  issuer=issuer)
    except IdTokenError as err:
        raise RefreshIdTokenError(str(err)) from None
    if claims["sub"] != subject:
        raise RefreshIdTokenError("The id_token names another Brex user than the connection's.")


def required_scopes_only(scopes: list[str]) -> bool:
    """True when ``scopes`` holds nothing beyond ``openid`` and ``offline_access``."""
    return not [s for s in scopes if s not in REQUIRED_SCOPES]
