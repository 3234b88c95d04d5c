"""A browser's part in the consent flow, for :meth:`FakeBrex.consent`: open the authorize
page over real HTTP, fill its form as a person would, submit it, and report where the browser
is sent back to."""

from __future__ import annotations

import html
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from html.parser import HTMLParser
from typing import Any

from .messages import FORM


class _FormParser(HTMLParser):
    """Collects the controls of one ``<form>`` of a page, as a browser would see them."""

    def __init__(self, form_id: str) -> None:
        super().__init__(convert_charrefs=True)
        self.form_id = form_id
        self.found = False
        self.action = ""
        self.method = "get"
        self.controls: list[dict[str, str]] = []
        self._inside = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {key: value if value is not None else "" for key, value in attrs}
        if tag == "form" and attributes.get("id") == self.form_id:
            self.found = self._inside = True
            self.action = attributes.get("action", "")
            self.method = attributes.get("method", "get").lower()
        elif self._inside and tag in ("input", "button"):
            self.controls.append({"tag": tag, **attributes})

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._inside = False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def _http(method: str, url: str, data: list[tuple[str, str]] | None = None) -> tuple[int, Any, str]:
    body = urllib.parse.urlencode(data).encode("ascii") if data is not None else None
    request = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        request.add_header("Content-Type", FORM)
    request.add_header("Accept", "text/html")
    try:
        with _OPENER.open(request, timeout=30) as response:
            return response.status, response.headers, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, error.read().decode("utf-8", "replace")


def page_text(page: str) -> str:
    """The words a person reads on ``page``."""
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", page, flags=re.S | re.I)
    text = html.unescape(re.sub(r"<[^>]+>", " ", text))
    return re.sub(r"\s+", " ", text).strip()


def walk_consent(
    authorize_url: str,
    *,
    own_authorize: str,
    scopes: Iterable[str] | None,
    deny: bool,
    email: str | None,
) -> str:
    """Where the browser is sent back to after consenting at ``authorize_url``.

    Redirects leading to ``own_authorize`` (the fake's authorize endpoint) are followed
    first; one leading elsewhere is the answer. ``scopes=None`` keeps every requested scope
    checked; ``email`` signs in as that user; ``deny`` submits Deny instead of Allow.
    ``AssertionError`` with the page's text when an error page is shown instead.
    """
    authorize_url, left_to, page = _open_authorize_page(authorize_url, own_authorize)
    if left_to is not None:
        return left_to
    form = _FormParser("consent-form")
    form.feed(page)
    if not form.found:
        raise AssertionError(f"no consent form on the authorize page: {page_text(page)}")
    data = _form_data(form.controls, None if scopes is None else set(scopes), email)
    data.append(("decision", "deny" if deny else "allow"))
    action = urllib.parse.urljoin(authorize_url, form.action or authorize_url)
    status, headers, page = _http("POST", action, data)
    if 300 <= status < 400 and headers.get("Location"):
        return str(headers["Location"])
    raise AssertionError(f"consent answered HTTP {status}: {page_text(page)}")


def _open_authorize_page(authorize_url: str, own_authorize: str) -> tuple[str, str | None, str]:
    """GET the authorize page, following redirects to ``own_authorize``: the URL it was
    found at, and either the ``Location`` of a redirect elsewhere or the page."""
    for _ in range(5):
        status, headers, page = _http("GET", authorize_url)
        location = str(headers.get("Location") or "")
        if not (300 <= status < 400 and location):
            break
        target = urllib.parse.urljoin(authorize_url, location)
        if target.split("?", 1)[0] != own_authorize:
            return authorize_url, location, ""
        authorize_url = target
    if status != 200:
        raise AssertionError(f"authorize answered HTTP {status}: {page_text(page)}")
    return authorize_url, None, page


def _form_data(
    controls: list[dict[str, str]], wanted: set[str] | None, email: str | None
) -> list[tuple[str, str]]:
    """What a browser submits from ``controls``: the ``wanted`` scopes checked (all when
    ``None``) and ``email`` typed in (added when the form has no such field)."""
    data: list[tuple[str, str]] = []
    sent_email = False
    for control in controls:
        name = control.get("name")
        kind = control.get("type", "submit" if control["tag"] == "button" else "text").lower()
        if not name or control["tag"] == "button" or kind in ("submit", "button", "reset"):
            continue
        value = control.get("value", "")
        if kind in ("checkbox", "radio"):
            if name == "scope" and wanted is not None:
                checked = value in wanted
            else:
                checked = "checked" in control
            if checked:
                data.append((name, value or "on"))
            continue
        if name == "email":
            sent_email = True
            if email is not None:
                value = email
        data.append((name, value))
    if email is not None and not sent_email:
        data.append(("email", email))
    return data
