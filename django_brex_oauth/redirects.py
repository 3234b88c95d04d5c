"""Where a person may be sent after connecting or disconnecting: ``next`` is followed only
when it stays on this site."""

from __future__ import annotations

from django.http import HttpRequest
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.translation import gettext_lazy as _

from .exceptions import BrexOAuthError


class UnsafeNext(BrexOAuthError):
    """``next`` points outside this site (an open redirect), so nothing is started."""

    title = _("That link cannot be followed")
    user_message = _(
        "The address to return to after connecting Brex points outside this site, so it "
        "was refused. Nothing was started. Please use the Connect button on this site."
    )


def safe_next(request: HttpRequest, value: str | None) -> str | None:
    """``value`` when it is a URL on this site, ``""`` when there is none, and None when it
    must be refused (another host, or plain HTTP from a secure request)."""
    if not value:
        return ""
    if url_has_allowed_host_and_scheme(
        value, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return value
    return None
