"""The Brex API endpoints at ``{base_url}``: ``/v2/users/me``, ``/v2/users``,
``/v2/users/{id}``, ``/v2/company`` and ``/v1/referrals``, with Brex's error shapes (the
webhook endpoints are :mod:`..fake_webhooks`)."""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from collections.abc import Callable
from typing import Any

from .base import FakeBrexBase
from .messages import (
    Request,
    Response,
    api_error,
    b64url,
    first,
    html_response,
    iso,
    json_response,
    random_id,
)
from .pages import page
from .scopes import REFERRALS_SCOPE
from .tokens import AccessToken

IDENTITY_FAULTS: tuple[str, ...] = (
    "not_json",
    "json_list",
    "json_string",
    "wrong_types",
)
"""Values accepted by :attr:`FakeBrex.identity_fault`."""

_UNAUTHORIZED = {"type": "UNAUTHORIZED", "message": "PERMISSION_DENIED: Invalid or Revoked Token"}

Route = dict[str, Callable[..., Response]]


class ApiEndpoints(FakeBrexBase):
    """The API, for a user's token (users, company) or the client's (referrals)."""

    def _api_route(self, path: str) -> tuple[Route | None, dict[str, str]]:
        exact: dict[str, Route] = {
            "/v2/users/me": {"GET": self._api_me},
            "/v2/users": {"GET": self._api_users},
            "/v2/company": {"GET": self._api_company},
            "/v1/referrals": {"POST": self._api_create_referral},
        }
        if path in exact:
            return exact[path], {}
        route, params = self.webhooks.routes(path)
        if route is not None:
            return route, params
        match = re.fullmatch(r"/v2/users/([^/]+)", path)
        if match:
            return {"GET": self._api_user}, {"user_id": urllib.parse.unquote(match.group(1))}
        match = re.fullmatch(r"/v1/referrals/([^/]+)", path)
        if match:
            return {"GET": self._api_referral}, {"referral_id": urllib.parse.unquote(match[1])}
        return None, {}

    def _api_auth(
        self, request: Request, *scopes: str, user_token: bool = False
    ) -> tuple[AccessToken | None, Response | None]:
        """The request's token if it has one of ``scopes`` (and is a user's token when
        ``user_token``), else the error to answer with."""
        record = self._bearer(request)
        if record is None:
            return None, json_response(401, _UNAUTHORIZED)
        if not any(scope in record.scopes for scope in scopes):
            needed = " or ".join(scopes)
            return None, api_error(
                403, f"PERMISSION_DENIED: Missing required scope: {needed}", "INSUFFICIENT_SCOPE"
            )
        if user_token and record.user_id is None:
            return None, api_error(
                403, "PERMISSION_DENIED: This endpoint needs a user's token", "FORBIDDEN"
            )
        return record, None

    # ---------------------------------------------------------------------------- users

    def _api_me(self, request: Request) -> Response:
        record, problem = self._api_auth(request, "users", "users.readonly", user_token=True)
        if problem is not None or record is None:
            return problem or json_response(401, _UNAUTHORIZED)
        user = self._user_by_id(record.user_id)
        if user is None:
            return api_error(404, "User not found", "NOT_FOUND")
        return self._identity_answer(user)

    def _api_user(self, request: Request, user_id: str) -> Response:
        _, problem = self._api_auth(request, "users", "users.readonly")
        if problem is not None:
            return problem
        user = self._user_by_id(user_id)
        if user is None:
            return api_error(404, f"User {user_id} not found", "NOT_FOUND")
        return json_response(200, user)

    def _api_users(self, request: Request) -> Response:
        _, problem = self._api_auth(request, "users", "users.readonly")
        if problem is not None:
            return problem
        query = first(request.query)
        try:
            limit = int(query.get("limit") or 100)
        except ValueError:
            limit = 0
        if not 1 <= limit <= 1000:
            return api_error(400, "limit must be an integer between 1 and 1000", "BAD_REQUEST")
        offset = 0
        cursor = query.get("cursor")
        if cursor:
            try:
                offset = int(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
            except (binascii.Error, ValueError):
                return api_error(400, "Invalid cursor", "BAD_REQUEST")
        users = self.users
        if query.get("email"):
            users = [user for user in users if user["email"].lower() == query["email"].lower()]
        next_offset = offset + limit
        next_cursor = None
        if next_offset < len(users):
            next_cursor = b64url(str(next_offset).encode("ascii"))
        return json_response(
            200, {"items": users[offset:next_offset], "next_cursor": next_cursor}
        )

    # ---------------------------------------------------------------------------- company

    def _api_company(self, request: Request) -> Response:
        _, problem = self._api_auth(request, "companies.readonly")
        if problem is not None:
            return problem
        return self._identity_answer(self.company)

    def _identity_answer(self, data: dict[str, Any]) -> Response:
        """``data`` as JSON, or malformed as :attr:`FakeBrex.identity_fault` says."""
        fault = self._identity_fault
        if fault == "not_json":
            return html_response(200, page("Brex", "<p>Something went wrong.</p>"))
        if fault == "json_list":
            return json_response(200, [data])
        if fault == "json_string":
            return json_response(200, str(data.get("id", "")))
        if fault == "wrong_types":
            return json_response(200, _wrong_types(data))
        return json_response(200, data)

    # ---------------------------------------------------------------------------- referrals

    def _api_create_referral(self, request: Request) -> Response:
        _, problem = self._api_auth(request, REFERRALS_SCOPE)
        if problem is not None:
            return problem
        key = (request.headers.get("Idempotency-Key") or "").strip()
        if not key:
            return api_error(400, "Missing required header: Idempotency-Key", "BAD_REQUEST")
        if key in self.idempotency_keys:
            return json_response(200, self.referrals[self.idempotency_keys[key]])
        body = request.json()
        if not isinstance(body, dict):
            return api_error(400, "The request body must be a JSON object", "BAD_REQUEST")
        referral_id = random_id("referral_")
        referral = {
            "id": referral_id,
            "referral_signup_url": f"{self.base_url}/signup/{referral_id}",
            "status": "UNCLAIMED",
            "expires_at": iso(self._now() + 30 * 24 * 3600),
            "products": body.get("products") or [],
            "referral_code": body.get("referral_code"),
            "applicant": body.get("applicant"),
            "business": body.get("business"),
        }
        self.referrals[referral_id] = referral
        self.idempotency_keys[key] = referral_id
        return json_response(200, referral)

    def _api_referral(self, request: Request, referral_id: str) -> Response:
        _, problem = self._api_auth(request, REFERRALS_SCOPE)
        if problem is not None:
            return problem
        referral = self.referrals.get(referral_id)
        if referral is None:
            return api_error(404, f"Referral {referral_id} not found", "NOT_FOUND")
        return json_response(200, referral)


def _wrong_types(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with every field of the wrong type: a list for the email, an object for the
    status, numbers for the rest."""
    wrong: dict[str, Any] = {}
    for index, (key, value) in enumerate(data.items()):
        if key == "email":
            wrong[key] = [value]
        elif key == "status":
            wrong[key] = {"value": value}
        else:
            wrong[key] = 10_000 + index
    return wrong
