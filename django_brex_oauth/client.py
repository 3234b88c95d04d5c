"""Calling the Brex API.

:class:`BrexClient` is bound to one connection and never makes its caller think about
tokens::

    client = BrexClient(connection)
    me = client.get_me()
    for user in client.iter_items("/v2/users"):
        ...

It sends the connection's access token, refreshes it first when it is about to expire and
once more when Brex answers 401, retries 429, 5xx and network errors with exponential
backoff and jitter when the call is idempotent (every POST carries an ``Idempotency-Key``,
the same one on each retry), honours Brex's ``Retry-After`` for every caller of the same
Brex account (the wait is kept in the database, so every process waits; a wait longer than
``RETRY_BACKOFF_MAX`` raises at once instead of tying the caller up), follows
``next_cursor`` pagination, and raises typed errors:
:class:`BrexAPIError` with Brex's ``{type, message, code}``; :class:`BrexAPIUnavailable`
(both a ``BrexAPIError`` and a :class:`BrexUnavailable`) for a 429 or 5xx that outlasted
the retries; :class:`BrexUnavailable` for a network error or timeout;
:class:`ConnectionNotUsable` when the customer must reconnect.

:class:`OnboardingClient` calls the onboarding (referrals) API with a client-credentials
token. A client instance is meant for one thread at a time.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import requests
from django.views.decorators.debug import sensitive_variables

from . import http
from .backoff import backoff_delay
from .conf import brex_settings
from .exceptions import BrexAPIError, BrexAPIUnavailable, BrexUnavailable, ConnectionNotUsable
from .http import NOT_JSON, is_transient_status, json_body, json_object, retry_after_of, unavailable
from .models import BrexConnection, ConnectionStatus
from .services import client_credentials, refresh, throttle

#: Methods that are safe to send again; POST joins them because it always carries an
#: Idempotency-Key.
RETRYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "POST"})


def _error_from_response(response: requests.Response, method: str, path: str) -> BrexAPIError:
    """The typed error for an answer of 400 or more: :class:`BrexAPIUnavailable` for 429 and
    5xx, :class:`BrexAPIError` otherwise."""
    body = json_object(response)
    transient = is_transient_status(response.status_code)
    error_class = BrexAPIUnavailable if transient else BrexAPIError
    return error_class(
        response.status_code,
        error_type=body.get("type"),
        message=body.get("message"),
        code=body.get("code"),
        method=method,
        path=path,
        retry_after=retry_after_of(response.headers) if transient else None,
    )


def _json_or_none(response: requests.Response) -> Any:
    if response.status_code == 204 or not response.content:
        return None
    body = json_body(response)
    return None if body is NOT_JSON else body


@sensitive_variables()
def get_with_token(access_token: str, path: str, *, session=None) -> Any:
    """GET ``path`` from the API server with ``access_token`` once; JSON in, typed errors out.

    No refresh and no retry: for the moment right after connecting, before a connection
    exists. Returns ``None`` when a successful answer is not JSON (the caller checks the
    shape). Raises :class:`BrexUnavailable` for network errors, and
    :class:`BrexAPIUnavailable` (a ``BrexUnavailable``) for 429 and 5xx.
    """
    url = brex_settings.api_base_url + path
    session = session or http.session()
    try:
        response = session.get(
            url,
            headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
        )
    except requests.RequestException as err:
        raise unavailable(err) from err
    if response.status_code >= 400:
        raise _error_from_response(response, "GET", path)
    return _json_or_none(response)


class _APIClient:
    """Requests with a bearer token, retries, pagination and typed errors."""

    #: Pauses between retries (a test may record the pauses instead).
    sleep = staticmethod(time.sleep)

    def __init__(
        self,
        *,
        session: requests.Session | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
    ) -> None:
        self.session = session or http.session()
        self.timeout = timeout
        self.max_retries = (
            brex_settings.API_MAX_RETRIES if max_retries is None else int(max_retries)
        )

    @property
    def base_url(self) -> str:
        """The API server calls go to."""
        return brex_settings.api_base_url

    # Hooks for the token.

    def _access_token(self) -> str:
        raise NotImplementedError

    def _access_token_rejected(self, access_token: str) -> bool:
        """Brex answered 401 to ``access_token``: get another; False when there is none."""
        raise NotImplementedError

    def _throttle_scope(self) -> str:
        """The scope of Brex's rate limit these calls fall under (see
        :mod:`~django_brex_oauth.services.throttle`)."""
        raise NotImplementedError

    # Requests.

    @sensitive_variables("access_token")
    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Any:
        """Send one API call and return its JSON body (None when it has none).

        ``path`` is relative to the API server, e.g. ``"/v2/users/me"``. A POST always sends
        an ``Idempotency-Key`` (``idempotency_key`` or a new UUID), the same on every retry.
        """
        method = method.upper()
        extra = {"Accept": "application/json", **dict(headers or {})}
        if method == "POST":
            extra["Idempotency-Key"] = idempotency_key or str(uuid.uuid4())
        elif idempotency_key:
            extra["Idempotency-Key"] = idempotency_key
        retryable = method in RETRYABLE_METHODS
        scope = self._throttle_scope()
        self._wait_for_brex(scope, method, path)
        access_token = self._access_token()
        refreshed_on_401 = False
        attempt = 0
        while True:
            try:
                response = self._send(method, path, access_token, params, json, extra)
            except requests.RequestException as err:
                if retryable and attempt < self.max_retries:
                    self._pause(attempt)
                    attempt += 1
                    continue
                raise unavailable(err) from err
            status = response.status_code
            if status == 401 and not refreshed_on_401:
                refreshed_on_401 = True
                if self._access_token_rejected(access_token):
                    access_token = self._access_token()
                    continue
            retry_after = retry_after_of(response.headers) if is_transient_status(status) else None
            if retry_after:
                self._hold(scope, retry_after, f"{method} {path} answered HTTP {status}")
            if (
                is_transient_status(status)
                and retryable
                and attempt < self.max_retries
                # Never retry before Brex's Retry-After; a longer wait is the caller's.
                and (retry_after or 0.0) <= brex_settings.RETRY_BACKOFF_MAX
            ):
                self._pause(attempt, retry_after)
                attempt += 1
                continue
            if status >= 400:
                raise _error_from_response(response, method, path)
            return _json_or_none(response)

    def _wait_for_brex(self, scope: str, method: str, path: str) -> None:
        """Wait out a ``Retry-After`` another call (in any process) got for this scope, or
        raise :class:`BrexAPIUnavailable` when it is longer than ``RETRY_BACKOFF_MAX``."""
        try:
            throttle.wait_for(
                scope, "the Brex API", max_wait=brex_settings.RETRY_BACKOFF_MAX,
                sleep=self.sleep,
            )
        except BrexUnavailable as err:
            raise BrexAPIUnavailable(
                429, message=str(err), method=method, path=path, retry_after=err.retry_after
            ) from None

    @staticmethod
    def _hold(scope: str, seconds: float, detail: str) -> None:
        throttle.hold(scope, seconds, detail)

    # requests holds the token under other names (the headers): hide all of it.
    @sensitive_variables()
    def _send(
        self,
        method: str,
        path: str,
        access_token: str,
        params: Mapping[str, Any] | None,
        json: Any,
        headers: dict[str, str],
    ) -> requests.Response:
        kwargs: dict[str, Any] = {}
        if self.timeout is not None:
            kwargs["timeout"] = self.timeout
        return self.session.request(
            method,
            self.base_url + path,
            params=params,
            json=json,
            headers={**headers, "Authorization": f"Bearer {access_token}"},
            **kwargs,
        )

    def _pause(self, attempt: int, retry_after: float | None = None) -> None:
        cap = brex_settings.RETRY_BACKOFF_MAX
        delay = backoff_delay(attempt, base=brex_settings.RETRY_BACKOFF, cap=cap)
        self.sleep(max(delay, retry_after or 0.0))

    def get(self, path: str, *, params: Mapping[str, Any] | None = None) -> Any:
        """GET ``path``."""
        return self.request("GET", path, params=params)

    def post(self, path: str, json: Any = None, *, idempotency_key: str | None = None) -> Any:
        """POST ``json`` to ``path`` with an ``Idempotency-Key``."""
        return self.request("POST", path, json=json, idempotency_key=idempotency_key)

    def put(self, path: str, json: Any = None) -> Any:
        """PUT ``json`` to ``path``."""
        return self.request("PUT", path, json=json)

    def delete(self, path: str) -> Any:
        """DELETE ``path``."""
        return self.request("DELETE", path)

    # Pagination.

    def iter_pages(
        self, path: str, *, params: Mapping[str, Any] | None = None, limit: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Yield each page of a list endpoint, following ``next_cursor`` to the end.

        ``limit`` is the page size asked for (Brex's ``limit`` parameter).
        """
        query = dict(params or {})
        if limit is not None:
            query["limit"] = limit
        seen: set[str] = set()
        while True:
            page = self.get(path, params=query)
            if not isinstance(page, dict):
                raise BrexAPIError(200, message="A list endpoint answered something else.",
                                   method="GET", path=path)
            yield page
            cursor = page.get("next_cursor")
            if not cursor or cursor in seen:
                return
            seen.add(cursor)
            query["cursor"] = cursor

    def iter_items(
        self, path: str, *, params: Mapping[str, Any] | None = None, limit: int | None = None
    ) -> Iterator[Any]:
        """Yield every item of a list endpoint, page after page."""
        for page in self.iter_pages(path, params=params, limit=limit):
            yield from page.get("items") or []


class BrexClient(_APIClient):
    """The Brex API as one connection's customer granted it.

    ``BrexClient(connection)`` uses the API server of the connection's environment and its
    tokens, refreshing them as needed (see :mod:`django_brex_oauth.services.refresh`).
    Raises :class:`ConnectionNotUsable` when the connection is revoked or needs the
    customer to reconnect, including when a refresh on the way finds that out.
    """

    def __init__(self, connection, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.connection = connection
        self._token = None

    @classmethod
    def for_user(cls, user, connection_id: int, **kwargs: Any) -> BrexClient:
        """A client for connection ``connection_id`` when ``user`` may see it: their own
        personal connection or, with ``BREX_OAUTH_TEAM_MODEL``, one of a team the team
        policy lets them see (``BrexConnection.objects.for_user``). Raises
        ``BrexConnection.DoesNotExist`` for any other, so a view can answer 404."""
        return cls(BrexConnection.objects.for_user(user).get(pk=connection_id), **kwargs)

    @property
    def base_url(self) -> str:
        """The API server of the environment the connection was made in (``API_BASE_URL``
        applies to the configured ``ENVIRONMENT`` only)."""
        return brex_settings.api_base_url_for(self.connection.environment)

    def _not_usable(self, status: str | None = None) -> ConnectionNotUsable:
        status = status or self.connection.status
        return ConnectionNotUsable(
            f"Brex connection {self.connection.pk} cannot be used (status {status!r}); the "
            "customer must connect again."
        )

    def _access_token(self) -> str:
        margin = brex_settings.CLIENT_REFRESH_MARGIN
        token = self._token
        if token is None or token.access_token_expires_within(margin):
            result = refresh.refresh_connection(self.connection, min_validity=margin)
            self._adopt(result)
            token = self._token
        if token is None or not token.access_token:
            raise self._not_usable()
        if token.connection.status != ConnectionStatus.ACTIVE:
            raise self._not_usable(token.connection.status)
        return token.access_token

    @sensitive_variables()
    def _access_token_rejected(self, access_token: str) -> bool:
        result = refresh.refresh_connection(self.connection, stale_access_token=access_token)
        self._adopt(result)
        return True

    def _throttle_scope(self) -> str:
        return throttle.api_scope(self.connection)

    def _adopt(self, result) -> None:
        if result.token is not None:
            self.connection.status = result.token.connection.status
        elif result.outcome != refresh.Outcome.BUSY:
            # No token came back (none stored, or none readable): the status says why.
            self.connection.refresh_from_db(fields=["status"])
        if not result.usable:
            self._token = None
            raise self._not_usable()
        self._token = result.token

    def get_me(self) -> dict[str, Any]:
        """The Brex user who connected (``GET /v2/users/me``; scope ``users[.readonly]``)."""
        return self.get("/v2/users/me")

    def get_company(self) -> dict[str, Any]:
        """The customer's company (``GET /v2/company``; scope ``companies.readonly``)."""
        return self.get("/v2/company")


class OnboardingClient(_APIClient):
    """The onboarding API (referrals), called with a client-credentials token.

    The token comes from ``get_client_credentials_token()`` in
    :mod:`django_brex_oauth.services.client_credentials`, shared by every process through
    the Django cache.
    """

    #: The scope of the referrals API.
    REFERRALS_SCOPE = "https://onboarding.brexapis.com/referrals"

    def __init__(self, scopes: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scopes = list(scopes or [self.REFERRALS_SCOPE])

    def _access_token(self) -> str:
        return client_credentials.get_client_credentials_token(self.scopes)

    @sensitive_variables()
    def _access_token_rejected(self, access_token: str) -> bool:
        client_credentials.forget_client_credentials_token(self.scopes, access_token)
        return True

    def _throttle_scope(self) -> str:
        return throttle.api_scope(None)

    def create_referral(
        self, referral: Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Create a referral (``POST /v1/referrals``); pass ``idempotency_key`` to make a
        repeated call (say, after a crash) return the referral already created."""
        return self.post("/v1/referrals", dict(referral), idempotency_key=idempotency_key)

    def get_referral(self, referral_id: str) -> dict[str, Any]:
        """One referral (``GET /v1/referrals/{id}``)."""
        return self.get(f"/v1/referrals/{referral_id}")
