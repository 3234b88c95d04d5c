"""The errors this app raises.

Every error carries what a person needs to understand it (``user_message``) and what
an engineer needs to act on it (status, OAuth ``error`` code, Brex error type), and
never a token, code, verifier or client secret.

Configuration problems raise :class:`BrexOAuthConfigurationError`, an
:class:`~django.core.exceptions.ImproperlyConfigured` outside the
:class:`BrexOAuthError` hierarchy, so that code catching runtime failures does not
swallow a broken deployment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.core.exceptions import ImproperlyConfigured, SuspiciousOperation
from django.utils import translation
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

if TYPE_CHECKING:
    # A str or a lazy translation (django-stubs' name for it).
    from django.utils.functional import _StrOrPromise


class BrexOAuthConfigurationError(ImproperlyConfigured):
    """The ``BREX_OAUTH`` settings cannot work."""


class BrexOAuthError(Exception):
    """Base class of every runtime error raised by django_brex_oauth."""

    #: Short title shown on the error page.
    title: _StrOrPromise = _("Brex connection failed")
    #: What happened and what to do, in words for the person in front of the screen.
    user_message: _StrOrPromise = _(
        "Something went wrong while talking to Brex. Please try again."
    )
    #: HTTP status of the error page the views render.
    http_status = 400

    def __init__(self, message: str = "", *, user_message: _StrOrPromise | None = None) -> None:
        # The exception's own text is for logs and engineers: English, whatever language
        # the person's page is in (user_message is translated when the page shows it).
        super().__init__(message or untranslated(self.user_message))
        if user_message is not None:
            self.user_message = user_message


def untranslated(text: _StrOrPromise) -> str:
    """``text`` (a string or a lazy translation) in the source language, English."""
    with translation.override(None):
        return str(text)


# Authorization (the redirect back from Brex) ---------------------------------------------


class AuthorizationError(BrexOAuthError):
    """The redirect back from Brex cannot complete a connection."""


class RedirectURINotConfigured(AuthorizationError):
    """Neither ``REDIRECT_URI`` nor ``SITE_URL`` is set, so there is no callback URL to give
    Brex (it is never taken from the request's ``Host`` header)."""

    title = _("Connecting Brex is not set up on this site yet")
    user_message = _(
        "This site has not been told the address Brex should send you back to, so "
        "connecting was not started and nothing was stored. The site's administrators need "
        "to set BREX_OAUTH['SITE_URL'] (or BREX_OAUTH['REDIRECT_URI'])."
    )
    http_status = 503


class StateError(AuthorizationError, SuspiciousOperation):
    """The ``state`` is missing, unknown, used already, expired or bound to someone else."""

    title = _("This Brex sign-in link is no longer valid")
    user_message = _(
        "The link that brought you back from Brex is not valid for this session: it may "
        "have been used already, have expired, or have been started in another browser. "
        "Nothing was connected. Please start connecting again."
    )


class RepeatedParameter(AuthorizationError):
    """The redirect back from Brex repeats ``state``, ``code``, ``iss`` or ``error``, which
    RFC 6749 section 3.1 forbids: which value counts cannot be known, so none is used."""

    title = _("This Brex sign-in link is not valid")
    user_message = _(
        "The link that brought you back from Brex was malformed (it named a value more than "
        "once), so nothing was connected. Please start connecting again."
    )


class AccessDenied(AuthorizationError):
    """Brex redirected back with an ``error`` (usually ``access_denied``)."""

    title = _("Brex access was not granted")
    user_message = _(
        "You cancelled or declined access at Brex, so nothing was connected. You can "
        "connect again at any time."
    )

    def __init__(self, error: str, description: str = "") -> None:
        self.error = error
        self.description = description
        if error != "access_denied":
            super().__init__(
                f"Brex returned error {error!r}",
                user_message=gettext(
                    "Brex could not complete the request (%(error)s). Nothing was connected. "
                    "Please try again, or contact support if this keeps happening."
                ) % {"error": error},
            )
        else:
            super().__init__(f"Brex returned error {error!r}")


class TeamNotFound(AuthorizationError):
    """``connect?team=`` names no team (a malformed or forged id, or a deleted team)."""

    title = _("That team does not exist")
    user_message = _(
        "The team to connect Brex for could not be found, so nothing was started. "
        "Please go back to your team and use its Connect button."
    )
    http_status = 404


class TeamNotAllowed(AuthorizationError):
    """The user may not connect a Brex account for this team (or no longer may: they left
    it, or it was deleted, between connect and the callback)."""

    title = _("You cannot connect Brex for this team")
    user_message = _(
        "You are not allowed to connect a Brex account for this team, so nothing was "
        "connected. Ask one of the team's members to connect it."
    )
    http_status = 403


class IssuerMismatch(AuthorizationError, SuspiciousOperation):
    """The redirect back names another issuer in ``iss`` than the one the request went to, or
    names none although the issuer says it always does (RFC 9207, the mix-up defence)."""

    title = _("Brex sign-in could not be verified")
    user_message = _(
        "The answer that brought you back to this site did not come from the Brex sign-in "
        "this site uses, so it was refused and nothing was connected. Please start "
        "connecting again."
    )


class NoScopesGranted(AuthorizationError):
    """The person consented to none of the requested API scopes, or not to one that
    ``REQUIRED_API_SCOPES`` names."""

    title = _("No Brex permissions were granted")
    user_message = _(
        "You did not grant any of the permissions this site needs, so nothing was "
        "connected. Connect again and leave the permissions you want to share ticked."
    )


class OfflineAccessNotGranted(AuthorizationError):
    """Brex returned no refresh token, so the connection could not be kept alive."""

    title = _("Brex did not allow a lasting connection")
    user_message = _(
        "Brex did not allow this site to stay connected (no offline access was granted). "
        "Nothing was connected. Please connect again and allow offline access."
    )


# Protocol (token endpoint, id_token, discovery) -------------------------------------------


class TokenError(BrexOAuthError):
    """The token endpoint refused a request with an OAuth error."""

    title = _("Brex refused the request")
    user_message = _(
        "Brex refused to complete the connection. Nothing was connected. Please start "
        "connecting again."
    )

    def __init__(self, error: str, description: str = "", status: int | None = None) -> None:
        self.error = error
        self.description = description
        self.status = status
        super().__init__(f"Token endpoint answered {status}: {error}")


class InvalidGrant(TokenError):
    """``invalid_grant``: the code or refresh token is invalid, expired or revoked."""


class InvalidClient(TokenError):
    """``invalid_client`` or ``unauthorized_client``: Brex does not accept this site's client
    id or secret, or does not let this client use the grant. A fault of the site's
    configuration, never of one customer's connection."""

    title = _("This site's Brex credentials were refused")
    user_message = _(
        "Brex did not accept this site's credentials, so nothing was connected. Please "
        "tell the site's administrators."
    )
    http_status = 502


class IdTokenError(BrexOAuthError, SuspiciousOperation):
    """The id_token failed validation (signature, issuer, audience, times or nonce)."""

    title = _("Brex sign-in could not be verified")
    user_message = _(
        "The sign-in answer from Brex could not be verified, so nothing was connected. "
        "Please start connecting again."
    )


class RefreshIdTokenError(TokenError, IdTokenError):
    """The id_token that came with refreshed tokens failed validation (signature, issuer,
    audience, times, ``at_hash``, or a ``sub`` that is not the connection's Brex user).

    A :class:`TokenError` (OAuth ``error`` ``invalid_id_token``), so a refresh records and
    reports it as it does Brex refusing the request, and an :class:`IdTokenError`. The new
    tokens are not stored; the connection keeps the ones it had.
    """

    title = IdTokenError.title
    user_message = _(
        "Brex's answer to refreshing this connection could not be verified, so this site "
        "kept using the connection as it was. Please try again later."
    )

    def __init__(self, description: str) -> None:
        self.error = "invalid_id_token"
        self.description = description
        self.status = None
        BrexOAuthError.__init__(self, f"The id_token of the refreshed tokens was refused: "
                                f"{description}")


class DiscoveryError(BrexOAuthError):
    """The OpenID Connect discovery document or JWKS is unusable."""

    title = _("Brex is not reachable right now")
    user_message = _(
        "This site could not read Brex's sign-in configuration. Nothing was connected. "
        "Please try again in a few minutes."
    )
    http_status = 502


class BrexUnavailable(BrexOAuthError):
    """Brex could not be reached, timed out, or answered 429 or 5xx.

    ``retry_after`` is how many seconds Brex asked every caller to wait (its
    ``Retry-After`` header, or the rest of a wait another caller was asked for), or None.
    """

    title = _("Brex is not reachable right now")
    user_message = _(
        "Brex did not answer in time, so nothing was connected. Please try again in a "
        "few minutes."
    )
    http_status = 502
    #: Seconds Brex asked to wait before the next request, or None.
    retry_after: float | None = None

    def __init__(
        self, message: str, status: int | None = None, *, retry_after: float | None = None
    ) -> None:
        self.status = status
        self.retry_after = retry_after
        super().__init__(message)


class MalformedTokenResponse(BrexUnavailable):
    """The token endpoint answered success with something that is not a usable token answer
    (not a JSON object, a missing or non-string token, a nonsensical ``expires_in``, ...).

    A fault on Brex's side, handled like a 5xx: nothing from the answer is used (except a
    rotated refresh token, which the refresh service keeps) and the request is worth trying
    again. ``problems`` lists what was wrong, never quoting a value.
    """

    title = _("Brex sent an answer this site cannot use")
    user_message = _(
        "Brex answered with something this site could not use, so nothing was connected. "
        "Please try again in a few minutes."
    )

    def __init__(self, problems, status: int | None = 200) -> None:
        self.problems = tuple(problems)
        self.error = "invalid_response"
        self.description = "; ".join(self.problems)
        super().__init__(f"Brex sent a malformed token answer: {self.description}", status)


class RefreshPaused(BrexUnavailable):
    """Refreshing is paused for every connection: Brex refused this site's client
    credentials (``invalid_client``). The connection is fine; the site's configuration is
    not. ``retry_after`` is the time until the next probe of the credentials."""

    title = _("Brex refused this site's credentials")
    user_message = _(
        "This site cannot reach Brex right now because of a problem with its own "
        "configuration. Your connection is kept; please try again later."
    )


# Connections and API calls -----------------------------------------------------------------


class ConnectionNotUsable(BrexOAuthError):
    """The connection is revoked or needs the customer to reconnect."""

    title = _("This Brex connection needs attention")
    user_message = _("This Brex connection is not active. Please reconnect your Brex account.")


class BrexAPIError(BrexOAuthError):
    """A Brex API call failed; carries Brex's ``{type, message, code}`` error body."""

    def __init__(
        self,
        status: int,
        *,
        error_type: str | None = None,
        message: str | None = None,
        code: str | None = None,
        method: str = "",
        path: str = "",
        retry_after: float | None = None,
    ) -> None:
        detail = " ".join(p for p in (error_type, message, code) if p)
        super().__init__(f"{method} {path} answered {status}" + (f": {detail}" if detail else ""))
        self.status = status
        self.retry_after = retry_after
        self.error_type = error_type
        self.error_message = message
        self.code = code
        self.method = method
        self.path = path


class BrexAPIUnavailable(BrexAPIError, BrexUnavailable):
    """A Brex API call still answered 429 or 5xx after its retries.

    Both a :class:`BrexAPIError` (with the status and Brex's error body) and a
    :class:`BrexUnavailable` (nothing is wrong with the request or the connection: try
    again later), so either ``except`` catches it.
    """

    #: Always the HTTP status Brex answered, as for any :class:`BrexAPIError`.
    status: int

    title = BrexUnavailable.title
    user_message = _("Brex did not answer in time. Please try again in a few minutes.")
    http_status = BrexUnavailable.http_status
