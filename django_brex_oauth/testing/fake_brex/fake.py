""":class:`FakeBrex`: the server (:mod:`.server`), the authorization server's endpoints
(:mod:`.oauth`) and the API's (:mod:`.api`) on one state (:mod:`.base`), with what a test
does to it directly: play the person at Brex, move the clock, revoke, spoil id_tokens."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .api import IDENTITY_FAULTS, ApiEndpoints
from .browser import walk_consent
from .id_tokens import ID_TOKEN_FAULTS, new_signing_key
from .messages import ISSUER_PATH, Request, Response, api_error, oauth_error, unique
from .oauth import AUTHORIZATION_RESPONSE_FAULTS, OAuthEndpoints, Route
from .pages import favicon
from .scopes import DEFAULT_SCOPES
from .server import Serving


class FakeBrex(Serving, OAuthEndpoints, ApiEndpoints):
    """A fake Brex OAuth server and API on a loopback port, driven and inspected by tests.

    All state sits behind one lock, so it can be used from several threads; the server answers
    each request on its own thread.
    """

    def __enter__(self) -> FakeBrex:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def django_settings(self, **extra: Any) -> dict[str, Any]:
        """A ``BREX_OAUTH`` settings dict pointing a Django site at this fake."""
        return {
            "CLIENT_ID": self.client_id,
            "CLIENT_SECRET": self.client_secret,
            "ENVIRONMENT": "staging",
            "ISSUER": self.issuer,
            "API_BASE_URL": self.api_base_url,
            "SCOPES": list(DEFAULT_SCOPES),
            **extra,
        }

    # ---------------------------------------------------------------------------- consent

    def consent(
        self,
        authorize_url: str,
        *,
        scopes: Iterable[str] | None = None,
        deny: bool = False,
        user: str | None = None,
    ) -> str:
        """Walk through the consent page over HTTP and return where it redirects the browser.

        GETs ``authorize_url``, fills the consent form like a browser (``scopes=None`` keeps every
        requested scope checked, ``[]`` unchecks all of them) and submits Allow, or Deny when
        ``deny``; ``user`` (id or email) signs in as that user. Redirects leading to this fake's
        authorize endpoint are followed first. Returns the ``Location`` of the redirect back to
        the client, including error redirects. Raises ``AssertionError`` with the page text when
        the server shows an error page instead.
        """
        email = None
        if user is not None:
            chosen = self.find_user(user)
            email = chosen["email"] if chosen else user
        return walk_consent(
            authorize_url,
            own_authorize=f"{self.issuer}/v1/authorize",
            scopes=scopes,
            deny=deny,
            email=email,
        )

    # ---------------------------------------------------------------------------- controls

    def advance_time(self, seconds: float) -> None:
        """Move the fake's clock forward (expiries, ``iat``/``exp`` of new id_tokens)."""
        with self._lock:
            self._clock_offset += seconds

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far expired."""
        with self._lock:
            self.store.expire_access_tokens()

    def expire_refresh_token(self, refresh_token: str) -> None:
        """Make one refresh token expired (``KeyError`` if the fake never issued it)."""
        with self._lock:
            self.store.expire_refresh_token(refresh_token)

    def narrow_grant(self, refresh_token: str, scopes: Iterable[str]) -> None:
        """The customer takes scopes back at Brex: the grant of ``refresh_token`` keeps only
        those of ``scopes`` it had (``openid`` and ``offline_access`` always stay). Its next
        refreshes issue tokens for, and answer with, the narrower scopes. ``KeyError`` if
        the fake never issued the token."""
        with self._lock:
            self.store.narrow_grant(refresh_token, scopes)

    def revoke_all(self) -> None:
        """Revoke every user grant, as if each customer disconnected the app at Brex.

        Their refresh and access tokens stop working; client-credentials tokens are unaffected.
        """
        with self._lock:
            self.store.revoke_all()

    def rotate_signing_key(self, *, keep_old_in_jwks: bool = False) -> None:
        """Sign id_tokens with a new key; the JWKS keeps the old key only if asked."""
        key = new_signing_key()
        with self._lock:
            self._signing_key = key
            self._published_keys = [key, *self._published_keys] if keep_old_in_jwks else [key]

    @property
    def id_token_fault(self) -> str | None:
        """``None`` or one of :data:`ID_TOKEN_FAULTS`: the defect put into every id_token from
        now on (sign-in and refresh alike).

        ``bad_signature`` signs with a foreign key under the published ``kid``; ``alg_none`` sends
        an unsigned token; ``alg_hs256`` signs with HS256, the public key as the HMAC secret;
        ``wrong_aud``/``wrong_iss`` change that claim; ``extra_aud`` adds a second, foreign
        audience (with ``azp`` naming the client), ``extra_aud_no_azp`` the same without ``azp``;
        ``wrong_azp`` names another client in ``azp``; ``wrong_sub`` names another user;
        ``expired`` dates the token an hour in the past; ``stale_iat`` issues it a week ago
        (still unexpired); ``future_iat`` issues it an hour in the future;
        ``wrong_nonce``/``missing_nonce`` alter the nonce; ``bad_at_hash`` hashes another access
        token; ``unknown_kid`` signs with a key whose ``kid`` is never in the JWKS;
        ``missing_kid`` leaves ``kid`` out of the header.
        """
        return self._id_token_fault

    @id_token_fault.setter
    def id_token_fault(self, fault: str | None) -> None:
        with self._lock:
            self._id_token_fault = _checked_fault(fault, ID_TOKEN_FAULTS, "id_token")

    @property
    def refresh_id_token_fault(self) -> str | None:
        """``None`` or one of :data:`ID_TOKEN_FAULTS`: the defect put into the id_tokens that
        refreshes return from now on (it wins over :attr:`id_token_fault` there); sign-ins are
        left alone."""
        return self._refresh_id_token_fault

    @refresh_id_token_fault.setter
    def refresh_id_token_fault(self, fault: str | None) -> None:
        with self._lock:
            self._refresh_id_token_fault = _checked_fault(fault, ID_TOKEN_FAULTS, "id_token")

    @property
    def authorization_response_fault(self) -> str | None:
        """``None`` or one of :data:`AUTHORIZATION_RESPONSE_FAULTS`: the defect of every
        redirect back to the client from now on (codes, denials and errors alike).

        ``wrong_iss`` names :data:`FOREIGN_ISSUER` in ``iss`` (a mix-up attack);
        ``missing_iss`` leaves ``iss`` out, although discovery still advertises it when
        :attr:`authorization_response_iss_parameter_supported` is true.
        """
        return self._authorization_response_fault

    @authorization_response_fault.setter
    def authorization_response_fault(self, fault: str | None) -> None:
        with self._lock:
            self._authorization_response_fault = _checked_fault(
                fault, AUTHORIZATION_RESPONSE_FAULTS, "authorization response"
            )

    @property
    def identity_fault(self) -> str | None:
        """``None`` or one of :data:`IDENTITY_FAULTS`: how ``/v2/users/me`` and
        ``/v2/company`` answer from now on, with HTTP 200 and a malformed body.

        ``not_json`` sends an HTML page; ``json_list`` a JSON list holding the right object;
        ``json_string`` a JSON string; ``wrong_types`` the right object with every field of
        the wrong type (numbers for ids and names, a list for the email, an object for the
        status).
        """
        return self._identity_fault

    @identity_fault.setter
    def identity_fault(self, fault: str | None) -> None:
        with self._lock:
            self._identity_fault = _checked_fault(fault, IDENTITY_FAULTS, "identity")

    def emit(self, event_type: str, payload: Mapping[str, Any] | None = None,
             **options: Any) -> list[Any]:
        """Send a signed webhook event to the subscribed URLs (see
        :meth:`FakeWebhooks.emit <django_brex_oauth.testing.fake_webhooks.FakeWebhooks.emit>`)."""
        return self.webhooks.emit(event_type, payload, **options)

    # ---------------------------------------------------------------------------- inspection

    @property
    def signing_kid(self) -> str:
        """``kid`` of the key currently signing id_tokens."""
        return self._signing_key.kid

    def is_refresh_token_active(self, token: str) -> bool:
        """Whether a refresh request with ``token`` would succeed now (grace period included)."""
        with self._lock:
            return self.store.is_refresh_token_active(token)

    def live_grants(self) -> list[dict[str, Any]]:
        """The user grants not revoked, one ``{"user_id", "scopes"}`` per consent (or
        :meth:`issue_tokens`), e.g. to check that a refused sign-in left no grant alive."""
        with self._lock:
            return self.store.live_grants()

    def is_access_token_active(self, token: str) -> bool:
        """Whether ``token`` would be accepted by the API now."""
        with self._lock:
            return self.store.active_access_token(token) is not None

    def issue_tokens(
        self, *, scopes: Iterable[str] | None = None, user: str | None = None
    ) -> dict[str, Any]:
        """Mint a token set as a completed consent would, without any HTTP.

        ``scopes`` defaults to :data:`DEFAULT_SCOPES`; a refresh token is included when
        ``offline_access`` is among them, an id_token when ``openid`` is. ``user`` is an id or
        email (default: :attr:`default_user`). The answer always carries ``expires_in``.
        """
        with self._lock:
            chosen = self._user_or_default(user)
            granted = unique(scopes if scopes is not None else DEFAULT_SCOPES)
            grant = self.store.new_grant(chosen["id"], granted)
            response = self._token_set(
                grant,
                granted,
                nonce=None,
                with_refresh="offline_access" in granted,
                id_token_fault=self._id_token_fault,
            )
            response["expires_in"] = int(self.access_token_ttl)
            return response

    # ---------------------------------------------------------------------------- routing

    def _dispatch(self, request: Request) -> Response:
        route, params = self._route(request.path)
        if isinstance(route, Response):
            return route
        handler = route.get(request.method)
        if handler is None:
            response = api_error(405, "Method not allowed", "METHOD_NOT_ALLOWED")
            response.headers["Allow"] = ", ".join(route)
            return response
        return handler(request, **params)

    def _route(self, path: str) -> tuple[Route | Response, dict[str, str]]:
        """The handlers of ``path`` by method and their arguments, or a 404 answer."""
        if path == "/favicon.ico":
            return {"GET": favicon}, {}
        if path == ISSUER_PATH or path.startswith(ISSUER_PATH + "/"):
            route = self._oauth_routes().get(path[len(ISSUER_PATH) :])
            if route is None:
                return oauth_error(404, "not_found", f"No such endpoint: {path}"), {}
            return route, {}
        api_route, params = self._api_route(path)
        if api_route is None:
            return api_error(404, f"No such endpoint: {path}", "NOT_FOUND"), {}
        return api_route, params


def _checked_fault(fault: str | None, known: tuple[str, ...], what: str) -> str | None:
    if fault is not None and fault not in known:
        raise ValueError(f"unknown {what} fault {fault!r}; use one of {known}")
    return fault
