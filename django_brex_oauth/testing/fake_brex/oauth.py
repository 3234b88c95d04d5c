"""The authorization server's endpoints under ``{base_url}/oauth2/default``: discovery, keys,
authorize (with its consent page), token, revoke, introspect, userinfo and logout.

Each endpoint parses and checks its request, asks the token store (:mod:`.tokens`) to act,
and words the answer the way Brex's (Okta-style) server does.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from .base import FakeBrexBase
from .id_tokens import FOREIGN_ISSUER, mint_id_token
from .messages import (
    FORM,
    NO_STORE,
    Request,
    Response,
    add_query,
    equal,
    first,
    html_response,
    json_response,
    oauth_error,
    redirect,
    unique,
)
from .pages import consent_page, error_page, page
from .scopes import OIDC_SCOPES, REFERRALS_SCOPE
from .tokens import Grant, TokenError

AUTHORIZATION_RESPONSE_FAULTS: tuple[str, ...] = ("wrong_iss", "missing_iss")
"""Values accepted by :attr:`FakeBrex.authorization_response_fault`."""

_CHALLENGE_RE = re.compile(r"[A-Za-z0-9_-]{43}")
_BAD_CLIENT = (
    "Client authentication failed. Either the client or the client credentials are invalid."
)
_AUTH_METHODS = ["client_secret_post", "client_secret_basic"]
_CLAIMS = [
    "iss",
    "ver",
    "sub",
    "aud",
    "iat",
    "exp",
    "jti",
    "auth_time",
    "amr",
    "nonce",
    "at_hash",
    "email",
    "name",
    "given_name",
    "family_name",
]

Route = dict[str, Callable[..., Response]]
Routes = dict[str, Route]


class OAuthEndpoints(FakeBrexBase):
    """The OpenID Connect authorization server."""

    def _oauth_routes(self) -> Routes:
        discovery = {"GET": self._discovery}
        return {
            "/.well-known/openid-configuration": discovery,
            "/.well-known/oauth-authorization-server": discovery,
            "/v1/keys": {"GET": self._keys},
            "/v1/authorize": {"GET": self._authorize_page, "POST": self._authorize_submit},
            "/v1/token": {"POST": self._token},
            "/v1/revoke": {"POST": self._revoke},
            "/v1/introspect": {"POST": self._introspect},
            "/v1/userinfo": {"GET": self._userinfo, "POST": self._userinfo},
            "/v1/logout": {"GET": self._logout},
        }

    # ---------------------------------------------------------------------------- discovery

    def _discovery(self, request: Request) -> Response:
        self.stats["discovery"] += 1
        issuer = self.issuer
        iss_parameter = (
            {"authorization_response_iss_parameter_supported": True}
            if self.authorization_response_iss_parameter_supported
            else {}
        )
        return json_response(
            200,
            {
                "issuer": issuer,
                "authorization_endpoint": f"{issuer}/v1/authorize",
                "token_endpoint": f"{issuer}/v1/token",
                "userinfo_endpoint": f"{issuer}/v1/userinfo",
                "jwks_uri": f"{issuer}/v1/keys",
                "response_types_supported": ["code"],
                "response_modes_supported": ["query"],
                "grant_types_supported": [
                    "authorization_code",
                    "refresh_token",
                    "client_credentials",
                ],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "scopes_supported": [*self.scopes_supported, REFERRALS_SCOPE],
                "token_endpoint_auth_methods_supported": list(_AUTH_METHODS),
                "claims_supported": list(_CLAIMS),
                "code_challenge_methods_supported": ["S256"],
                "introspection_endpoint": f"{issuer}/v1/introspect",
                "introspection_endpoint_auth_methods_supported": list(_AUTH_METHODS),
                "revocation_endpoint": f"{issuer}/v1/revoke",
                "revocation_endpoint_auth_methods_supported": list(_AUTH_METHODS),
                "end_session_endpoint": f"{issuer}/v1/logout",
                "request_parameter_supported": False,
                "claims_parameter_supported": False,
                **iss_parameter,
            },
        )

    def _keys(self, request: Request) -> Response:
        self.stats["jwks"] += 1
        response = json_response(200, self.jwks())
        response.headers["Cache-Control"] = "max-age=300"
        return response

    def jwks(self) -> dict[str, Any]:
        """The JWKS document served at ``/v1/keys``."""
        with self._lock:
            return {"keys": [dict(key.jwk) for key in self._published_keys]}

    # ---------------------------------------------------------------------------- authorize

    def _check_authorize(self, params: Mapping[str, str]) -> Response | None:
        """An error page or error redirect for bad authorize parameters, else ``None``."""
        client_id = params.get("client_id", "")
        if not client_id:
            return error_page(400, "invalid_request", "The 'client_id' parameter is required.")
        if not equal(client_id, self.client_id):
            return error_page(400, "invalid_client", "Invalid value for 'client_id' parameter.")
        redirect_uri = params.get("redirect_uri", "")
        if not redirect_uri:
            return error_page(400, "invalid_request", "The 'redirect_uri' parameter is required.")
        if not self._redirect_uri_allowed(redirect_uri):
            return error_page(
                400,
                "invalid_request",
                "The 'redirect_uri' parameter must be a Login redirect URI in the client app "
                "settings.",
            )
        problem = self._authorize_problem(params)
        if problem is None:
            return None
        error, description = problem
        return self._authorization_response(
            redirect_uri,
            {"error": error, "error_description": description, "state": params.get("state")},
        )

    def _authorize_problem(self, params: Mapping[str, str]) -> tuple[str, str] | None:
        """The error to redirect back with for a request that names a known client and
        redirect URI, else ``None``."""
        if params.get("response_type") != "code":
            return (
                "unsupported_response_type",
                "The response type is not supported by the authorization server. "
                "Configured response types: [code].",
            )
        state = params.get("state")
        if not state or len(state) <= 8:
            return (
                "invalid_request",
                "The 'state' parameter is required and must be longer than 8 characters.",
            )
        return (
            _pkce_problem(params.get("code_challenge"), params.get("code_challenge_method"))
            or self._scope_problem(params.get("scope", "").split())
            or _prompt_problem(params.get("prompt", ""))
        )

    def _scope_problem(self, scopes: list[str]) -> tuple[str, str] | None:
        if "openid" not in scopes:
            return "invalid_scope", "The 'openid' scope is required."
        unknown = [scope for scope in scopes if scope not in self.scopes_supported]
        if unknown:
            return (
                "invalid_scope",
                "One or more scopes are not configured for the authorization server resource: "
                + " ".join(unknown),
            )
        return None

    def _authorize_page(self, request: Request) -> Response:
        self.stats["authorize"] += 1
        params = first(request.query)
        self.authorize_requests.append(dict(params))
        problem = self._check_authorize(params)
        if problem is not None:
            return problem
        return html_response(200, self._consent_page(params))

    def _consent_page(self, params: Mapping[str, str], error: str | None = None) -> str:
        hint = self.find_user(params["login_hint"]) if params.get("login_hint") else None
        return consent_page(
            params,
            action=f"{self.issuer}/v1/authorize",
            client_name=self.client_name,
            client_id=self.client_id,
            company_name=self.company.get("legal_name", "your company"),
            email=(hint or self.default_user)["email"],
            error=error,
        )

    def _authorize_submit(self, request: Request) -> Response:
        if request.content_type != FORM:
            return error_page(400, "invalid_request", "The consent form must be form-encoded.")
        form = first(request.form)
        params = {key: value for key, value in form.items() if key not in ("scope", "email")}
        params["scope"] = form.get("requested_scope", "")
        problem = self._check_authorize(params)
        if problem is not None:
            return problem
        decision = form.get("decision")
        if decision == "deny":
            return self._authorization_response(
                params["redirect_uri"],
                {
                    "error": "access_denied",
                    "error_description": "The resource owner or authorization server "
                    "denied the request.",
                    "state": params["state"],
                },
            )
        if decision != "allow":
            return error_page(400, "invalid_request", "Choose Allow or Deny.")
        login = form.get("email", "").strip()
        if login:
            user = self.find_user(login)
            if user is None or user["status"] in ("CLOSED", "DISABLED", "DELETED"):
                return html_response(
                    401,
                    self._consent_page(params, error=f"Sign-in failed: no active user {login}."),
                )
        else:
            hint = params.get("login_hint")
            user = (self.find_user(hint) if hint else None) or self.default_user
        return self._grant_code(params, user["id"], set(request.form.get("scope", [])))

    def _grant_code(self, params: Mapping[str, str], user_id: str, checked: set[str]) -> Response:
        """Redirect back with a code for the requested scopes that were left checked."""
        requested = unique(params["scope"].split())
        granted = [scope for scope in requested if scope in OIDC_SCOPES or scope in checked]
        code = self.store.issue_code(
            client_id=params["client_id"],
            redirect_uri=params["redirect_uri"],
            scopes=granted,
            user_id=user_id,
            nonce=params.get("nonce"),
            code_challenge=params.get("code_challenge") or None,
            ttl=self.authorization_code_ttl,
        )
        return self._authorization_response(
            params["redirect_uri"],
            {"code": code, "scope": " ".join(granted), "state": params["state"]},
        )

    def _authorization_response(
        self, redirect_uri: str, params: Mapping[str, str | None]
    ) -> Response:
        """The redirect back to the client, with ``iss`` (RFC 9207) unless a fault says not."""
        fault = self._authorization_response_fault
        if fault == "wrong_iss":
            iss: str | None = FOREIGN_ISSUER
        elif fault == "missing_iss":
            iss = None
        else:
            iss = self.issuer
        return redirect(add_query(redirect_uri, {**params, "iss": iss}))

    def _logout(self, request: Request) -> Response:
        params = first(request.query)
        target = params.get("post_logout_redirect_uri")
        if target and self._redirect_uri_allowed(target):
            return redirect(add_query(target, {"state": params.get("state")}))
        return html_response(200, page("Signed out", "<h1>You are signed out of Brex.</h1>"))

    # ---------------------------------------------------------------------------- token

    def _client_auth(self, request: Request, form: Mapping[str, str]) -> Response | None:
        """``None`` when the request authenticates this client, else the error to send."""
        authorization = request.headers.get("Authorization") or ""
        body_id = form.get("client_id")
        body_secret = form.get("client_secret")
        basic = authorization[:6].lower() == "basic "
        if basic:
            if body_secret is not None:
                return oauth_error(
                    400,
                    "invalid_request",
                    "Cannot supply multiple client credentials. Use one of the following: "
                    "credentials in the Authorization header, credentials in the post body.",
                )
            candidates = _basic_credentials(authorization[6:])
            if candidates is None:
                return oauth_error(401, "invalid_client", _BAD_CLIENT)
        elif body_id is not None and body_secret is not None:
            candidates = [(body_id, body_secret)]
        else:
            return oauth_error(401, "invalid_client", _BAD_CLIENT)
        for client_id, secret in candidates:
            if body_id is not None and body_id != client_id:
                continue
            if equal(client_id, self.client_id) and equal(secret, self.client_secret):
                return None
        challenge = {"WWW-Authenticate": 'Basic realm="FakeBrex"'} if basic else {}
        return oauth_error(
            401,
            "invalid_client",
            "The client secret supplied for a confidential client is invalid.",
            **challenge,
        )

    def _token(self, request: Request) -> Response:
        if request.content_type != FORM:
            return oauth_error(
                400,
                "invalid_request",
                "Bad request. Accept and/or Content-Type headers likely do not match supported "
                "values: use application/x-www-form-urlencoded.",
            )
        form = first(request.form)
        problem = self._client_auth(request, form)
        if problem is not None:
            return problem
        grant_type = form.get("grant_type", "")
        grants: dict[str, Callable[[Mapping[str, str]], dict[str, Any]]] = {
            "authorization_code": self._token_authorization_code,
            "refresh_token": self._token_refresh,
            "client_credentials": self._token_client_credentials,
        }
        if grant_type in grants:
            self.stats[f"token_{grant_type}"] += 1
            try:
                return json_response(200, grants[grant_type](form), NO_STORE)
            except TokenError as error:
                return oauth_error(400, error.error, error.description)
        if not grant_type:
            return oauth_error(400, "invalid_request", "The 'grant_type' parameter is required.")
        return oauth_error(
            400,
            "unsupported_grant_type",
            "The authorization grant type is not supported by the authorization server. "
            "Configured grant types: [authorization_code, refresh_token, client_credentials].",
        )

    def _token_authorization_code(self, form: Mapping[str, str]) -> dict[str, Any]:
        record, grant = self.store.redeem_code(
            form.get("code", ""), form.get("redirect_uri"), form.get("code_verifier")
        )
        return self._token_set(
            grant,
            record.scopes,
            nonce=record.nonce,
            with_refresh="offline_access" in record.scopes,
            id_token_fault=self._id_token_fault,
        )

    def _token_refresh(self, form: Mapping[str, str]) -> dict[str, Any]:
        record, grant, scopes = self.store.use_refresh_token(
            form.get("refresh_token", ""), form.get("scope", "").split()
        )
        body = self._token_set(
            grant,
            scopes,
            nonce=None,
            with_refresh=self.rotate_refresh_tokens,
            refresh_expires_at=record.expires_at,
            id_token_fault=self._refresh_id_token_fault or self._id_token_fault,
        )
        self.store.rotated(record)
        return body

    def _token_client_credentials(self, form: Mapping[str, str]) -> dict[str, Any]:
        scopes = unique(form.get("scope", "").split())
        if not scopes:
            raise TokenError(
                "invalid_scope",
                "The authorization server resource does not have any configured default scopes, "
                "'scope' must be provided.",
            )
        allowed = {*self.scopes_supported, REFERRALS_SCOPE} - set(OIDC_SCOPES)
        refused = [scope for scope in scopes if scope not in allowed]
        if refused:
            raise TokenError(
                "invalid_scope", "The following scopes are not allowed: " + " ".join(refused)
            )
        return {
            "token_type": "Bearer",
            "expires_in": int(self.access_token_ttl),
            "access_token": self.store.new_access_token(scopes, None, None),
            "scope": " ".join(scopes),
        }

    def _token_set(
        self,
        grant: Grant,
        scopes: list[str],
        *,
        nonce: str | None,
        with_refresh: bool,
        refresh_expires_at: float | None = None,
        id_token_fault: str | None = None,
    ) -> dict[str, Any]:
        """A token answer for ``grant``: an access token, and a refresh token and an
        id_token when asked for."""
        access_token = self.store.new_access_token(scopes, grant.user_id, grant)
        response: dict[str, Any] = {"token_type": "Bearer"}
        if self.include_expires_in:
            response["expires_in"] = int(self.access_token_ttl)
        response["access_token"] = access_token
        if self.include_scope:
            response["scope"] = " ".join(scopes)
        if with_refresh:
            response["refresh_token"] = self.store.new_refresh_token(grant, refresh_expires_at)
        user = self._user_by_id(grant.user_id)
        if "openid" in scopes and user is not None:
            response["id_token"] = mint_id_token(
                issuer=self.issuer,
                client_id=self.client_id,
                key=self._signing_key,
                user=user,
                user_ids=[other["id"] for other in self.users],
                now=int(self._now()),
                nonce=nonce,
                access_token=access_token,
                auth_time=grant.auth_time,
                fault=id_token_fault,
            )
        return response

    # ---------------------------------------------------------------------------- others

    def _revoke(self, request: Request) -> Response:
        if request.content_type != FORM:
            return oauth_error(
                400, "invalid_request", "The revocation request must be form-encoded."
            )
        form = first(request.form)
        problem = self._client_auth(request, form)
        if problem is not None:
            return problem
        token = form.get("token")
        if not token:
            return oauth_error(400, "invalid_request", "The 'token' parameter is required.")
        self.stats["revocations"] += 1
        self.store.revoke(token)
        return Response(200, b"", {"Cache-Control": "no-store"})

    def _introspect(self, request: Request) -> Response:
        if request.content_type != FORM:
            return oauth_error(400, "invalid_request", "The request must be form-encoded.")
        form = first(request.form)
        problem = self._client_auth(request, form)
        if problem is not None:
            return problem
        return json_response(200, self._introspection(form.get("token", "")))

    def _introspection(self, token: str) -> dict[str, Any]:
        access = self.store.active_access_token(token)
        if access is not None:
            data: dict[str, Any] = {
                "active": True,
                "token_type": "Bearer",
                "scope": " ".join(access.scopes),
                "client_id": access.client_id,
                "iat": int(access.issued_at),
                "exp": int(access.expires_at),
                "iss": self.issuer,
            }
            if access.user_id:
                data["sub"] = access.user_id
            return data
        if not self.store.is_refresh_token_active(token):
            return {"active": False}
        refresh = self.store.refresh_tokens[token]
        grant = self.store.grants[refresh.grant_id]
        return {
            "active": True,
            "token_type": "refresh_token",
            "scope": " ".join(grant.scopes),
            "client_id": grant.client_id,
            "iat": int(refresh.issued_at),
            "exp": int(refresh.expires_at),
            "sub": grant.user_id,
            "iss": self.issuer,
        }

    def _userinfo(self, request: Request) -> Response:
        record = self._bearer(request)
        if record is None:
            return oauth_error(
                401,
                "invalid_token",
                "The access token is invalid.",
                **{"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        user = self._user_by_id(record.user_id)
        if "openid" not in record.scopes or user is None:
            return oauth_error(
                403,
                "insufficient_scope",
                "The access token must provide access to at least one of these scopes: openid.",
                **{"WWW-Authenticate": 'Bearer error="insufficient_scope"'},
            )
        return json_response(
            200,
            {
                "sub": user["id"],
                "email": user["email"],
                "email_verified": True,
                "given_name": user["first_name"],
                "family_name": user["last_name"],
                "name": f"{user['first_name']} {user['last_name']}",
                "preferred_username": user["email"],
            },
        )


def _pkce_problem(challenge: str | None, method: str | None) -> tuple[str, str] | None:
    if challenge:
        if method != "S256":
            return "invalid_request", "The 'code_challenge_method' parameter must be 'S256'."
        if not _CHALLENGE_RE.fullmatch(challenge):
            return "invalid_request", "The 'code_challenge' parameter is invalid."
    elif method:
        return (
            "invalid_request",
            "The 'code_challenge' parameter is required with 'code_challenge_method'.",
        )
    return None


def _prompt_problem(prompt: str) -> tuple[str, str] | None:
    if "none" in prompt.split():
        return (
            "login_required",
            "The client specified not to prompt, but the user is not logged in.",
        )
    return None


def _basic_credentials(encoded: str) -> list[tuple[str, str]] | None:
    """The (id, secret) pairs HTTP Basic credentials may mean (as sent, and form-decoded as
    RFC 6749 asks), or ``None`` when they are not Base64."""
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    raw_id, _, raw_secret = decoded.partition(":")
    return [
        (raw_id, raw_secret),
        (urllib.parse.unquote_plus(raw_id), urllib.parse.unquote_plus(raw_secret)),
    ]
