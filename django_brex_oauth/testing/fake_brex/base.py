"""What every part of :class:`~.FakeBrex` shares: its settings, users and company, clock,
lock, token store and addresses."""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..fake_webhooks import FakeWebhooks
from .faults import FaultRules
from .id_tokens import SigningKey, cached_key
from .messages import (
    ISSUER_PATH,
    Request,
    api_error,
    html_response,
    json_response,
    random_id,
)
from .pages import page
from .scopes import SUPPORTED_SCOPES
from .tokens import AccessToken, TokenStore

DEFAULT_CLIENT_NAME = "Ledgerline"
"""The app name the consent page shows unless told another: the example project's site."""

_STAT_KEYS = (
    "token_authorization_code",
    "token_refresh_token",
    "token_client_credentials",
    "refresh_token_reuse",
    "refresh_token_reuse_rejected",
    "revocations",
    "authorize",
    "jwks",
    "discovery",
    "rate_limited",
)


class FakeBrexBase:
    """The state of a fake Brex; :class:`~.FakeBrex` adds the server and the endpoints."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        client_id: str = "test-client-id",
        client_secret: str = "test-client-secret",
        client_name: str = DEFAULT_CLIENT_NAME,
        redirect_uris: Iterable[str] | None = None,
        access_token_ttl: float = 3600,
        refresh_token_lifetime: float = 90 * 24 * 3600,
        rotate_refresh_tokens: bool = True,
        refresh_grace_period: float = 30.0,
        include_expires_in: bool = True,
        include_scope: bool = True,
        authorization_response_iss_parameter_supported: bool = True,
        authorization_code_ttl: float = 60,
        users: Sequence[Mapping[str, Any]] | None = None,
        company: Mapping[str, Any] | None = None,
        public_url: str | None = None,
    ) -> None:
        """Configure the fake; nothing listens until :meth:`start`.

        ``client_name`` is the app's name as registered at Brex, which the consent page shows.
        ``redirect_uris=None`` accepts any absolute redirect URI, otherwise one must match exactly.
        ``users`` replaces the five default users (the first one is :attr:`default_user`);
        missing fields get defaults. ``company`` is merged over the default company.
        ``public_url`` overrides :attr:`base_url` when clients reach the fake at another address
        (e.g. when it listens on ``0.0.0.0`` inside a container).
        ``authorization_response_iss_parameter_supported`` is advertised in discovery, as a
        server implementing RFC 9207 does; the redirect back always carries ``iss`` unless
        :attr:`authorization_response_fault` says otherwise.
        """
        self.host = host
        self.port = port
        self.client_id = client_id
        self.client_secret = client_secret
        self.client_name = client_name
        self.redirect_uris: list[str] | None = (
            None if redirect_uris is None else list(redirect_uris)
        )
        self.access_token_ttl = access_token_ttl
        self.refresh_token_lifetime = refresh_token_lifetime
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.refresh_grace_period = refresh_grace_period
        self.include_expires_in = include_expires_in
        self.include_scope = include_scope
        self.authorization_response_iss_parameter_supported = (
            authorization_response_iss_parameter_supported
        )
        self.authorization_code_ttl = authorization_code_ttl
        self.public_url = public_url
        self.scopes_supported: list[str] = list(SUPPORTED_SCOPES)

        self.users: list[dict[str, Any]] = [
            self._normalise_user(user)
            for user in (self._default_users() if users is None else users)
        ]
        if not self.users:
            raise ValueError("FakeBrex needs at least one user")
        self.company: dict[str, Any] = {**self._default_company(), **dict(company or {})}

        self.requests: list[dict[str, Any]] = []
        self.authorize_requests: list[dict[str, Any]] = []
        self.stats: Counter[str] = Counter(dict.fromkeys(_STAT_KEYS, 0))
        self.errors: list[str] = []
        self.referrals: dict[str, dict[str, Any]] = {}
        self.idempotency_keys: dict[str, str] = {}

        self._lock = threading.RLock()
        self._clock_offset = 0.0
        self._id_token_fault: str | None = None
        self._refresh_id_token_fault: str | None = None
        self._authorization_response_fault: str | None = None
        self._identity_fault: str | None = None
        self._signing_key: SigningKey = cached_key("signing")
        self._published_keys: list[SigningKey] = [self._signing_key]
        #: Grants, codes and tokens (see :mod:`.tokens`); used under ``_lock``.
        self.store = TokenStore(self, self._now, self.stats)
        #: The failures, spoilt and held answers, rate limits and latencies to come.
        self._faults = FaultRules(self.stats)
        #: Webhook subscriptions, secrets and deliveries (see :mod:`.fake_webhooks`).
        self.webhooks = FakeWebhooks(
            self,
            {"json": json_response, "api_error": api_error, "html": html_response, "page": page},
        )

    # ---------------------------------------------------------------------------- addresses

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the fake (and of its API)."""
        if self.public_url:
            return self.public_url.rstrip("/")
        if not self.port:
            raise RuntimeError("FakeBrex has no port yet: call start() first")
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def issuer(self) -> str:
        """The OpenID issuer: ``base_url + "/oauth2/default"``."""
        return self.base_url + ISSUER_PATH

    @property
    def api_base_url(self) -> str:
        """Base URL of the Brex API endpoints (the same server)."""
        return self.base_url

    def _redirect_uri_allowed(self, redirect_uri: str) -> bool:
        if self.redirect_uris is not None:
            return redirect_uri in self.redirect_uris
        parts = urllib.parse.urlsplit(redirect_uri)
        return bool(parts.scheme and parts.netloc) and not parts.fragment

    # ---------------------------------------------------------------------------- users

    @property
    def default_user(self) -> dict[str, Any]:
        """The user who signs in unless another one is chosen."""
        return self.users[0]

    def find_user(self, user: str) -> dict[str, Any] | None:
        """The user whose id or email (any case) is ``user``, or ``None``."""
        wanted = user.strip().lower()
        for candidate in self.users:
            if candidate["id"].lower() == wanted or candidate["email"].lower() == wanted:
                return candidate
        return None

    def _user_or_default(self, user: str | None) -> dict[str, Any]:
        if user is None:
            return self.default_user
        chosen = self.find_user(user)
        if chosen is None:
            raise LookupError(f"no such fake Brex user: {user!r}")
        return chosen

    def _user_by_id(self, user_id: str | None) -> dict[str, Any] | None:
        return next((user for user in self.users if user["id"] == user_id), None)

    @staticmethod
    def _default_users() -> list[dict[str, Any]]:
        names = [
            ("Ada", "Lovelace", "ACTIVE"),
            ("Grace", "Hopper", "ACTIVE"),
            ("Alan", "Turing", "ACTIVE"),
            ("Katherine", "Johnson", "ACTIVE"),
            ("Edsger", "Dijkstra", "INVITED"),
        ]
        return [
            {
                "first_name": first,
                "last_name": last,
                "email": f"{first.lower()}.{last.lower()}@example.com",
                "status": status,
            }
            for first, last, status in names
        ]

    @staticmethod
    def _normalise_user(user: Mapping[str, Any]) -> dict[str, Any]:
        user_id = user.get("id") or random_id("cuuser_")
        data: dict[str, Any] = {
            "id": user_id,
            "first_name": "Test",
            "last_name": "User",
            "email": f"{user_id}@example.com",
            "status": "ACTIVE",
            "manager_id": None,
            "department_id": None,
            "location_id": None,
            "title_id": None,
            "remote_display_id": None,
            "metadata": {},
        }
        data.update(user)
        data["id"] = user_id
        return data

    @staticmethod
    def _default_company() -> dict[str, Any]:
        return {
            "id": random_id("cuacc_"),
            "legal_name": "Acme Rockets, Inc.",
            "mailing_address": {
                "line1": "100 Launch Way",
                "line2": "Suite 400",
                "city": "San Francisco",
                "state": "CA",
                "country": "US",
                "postal_code": "94107",
                "phone_number": "+14155550100",
            },
            "accountType": "BREX_EMPOWER",
        }

    # ---------------------------------------------------------------------------- tokens

    def _bearer(self, request: Request) -> AccessToken | None:
        """The usable access token a request carries as ``Authorization: Bearer``."""
        authorization = request.headers.get("Authorization") or ""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self.store.active_access_token(token.strip())

    # ---------------------------------------------------------------------------- clock

    def _now(self) -> float:
        return time.time() + self._clock_offset
