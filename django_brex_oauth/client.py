"""Calling the Brex API."""

from __future__ import annotations

from typing import Any

import requests

from .conf import brex_settings
from .exceptions import BrexAPIError, BrexUnavailable
from .http import new_session, unavailable


def _error_from_response(response: requests.Response, method: str, path: str) -> BrexAPIError:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    return BrexAPIError(
        response.status_code,
        error_type=body.get("type"),
        message=body.get("message"),
        code=body.get("code"),
        method=method,
        path=path,
    )


def get_with_token(access_token: str, path: str, *, session=None) -> Any:
    """GET ``path`` from the API server with ``access_token``; JSON in, typed errors out."""
    url = brex_settings.api_base_url + path
    session = session or new_session()
    try:
        response = session.get(
            url,
            headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
        )
    except requests.RequestException as err:
        raise unavailable(err) from err
    if response.status_code == 429 or response.status_code >= 500:
        raise BrexUnavailable(f"GET {path} answered HTTP {response.status_code}",
                              status=response.status_code)
    if response.status_code >= 400:
        raise _error_from_response(response, "GET", path)
    return response.json()
