"""What the app's admin pages share: how times and empty values read, how a connection is
named in a message, read-only model admins, search over the user model, and the notices
about talking to Brex (the client pause, Retry-After waits) shown above the lists.
"""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.exceptions import FieldDoesNotExist
from django.utils import formats, timezone
from django.utils.functional import Promise
from django.utils.translation import gettext, ngettext
from django.utils.translation import gettext_lazy as _

from .models import BrexConnection, RevocationStatus, ThrottleReason
from .services import throttle

StrOrPromise = str | Promise

#: What an empty cell shows, on every page of the app's admin.
EMPTY = "—"

#: The status of a revoked connection, said once with where its revocation at Brex stands.
REVOKED_STATUS: dict[str, StrOrPromise] = {
    RevocationStatus.NOT_REQUESTED: _("Revoked"),
    RevocationStatus.PENDING: _("Revoked, pending at Brex"),
    RevocationStatus.DONE: _("Revoked at Brex"),
    RevocationStatus.NOT_POSSIBLE: _("Revoked, Brex could not be told"),
}


def user_search_fields(prefix: str) -> list[str]:
    """Search fields for the user model's username and email, whatever the user model."""
    user_model = get_user_model()
    names = [user_model.USERNAME_FIELD]
    email = user_model.get_email_field_name()
    if email not in names:
        try:
            user_model._meta.get_field(email)
        except FieldDoesNotExist:
            pass
        else:
            names.append(email)
    return [f"{prefix}__{name}" for name in names]


def may_see_connections(user) -> bool:
    """The event log is part of a connection: whoever may see connections may read it."""
    return user.has_perm("brex_oauth.view_brexconnection") or user.has_perm(
        "brex_oauth.change_brexconnection"
    )


class ReadOnlyAdminMixin:
    """Nothing can be added, changed or deleted here: the services write these rows."""

    empty_value_display = EMPTY

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


def connection_label(connection: BrexConnection) -> str:
    """A connection as messages name it: "Acme Rockets, Inc. (#12)"."""
    return f"{connection.display_name or connection.brex_user_id} (#{connection.pk})"


#: The Retry-After notice of each kind of wait (the scope's prefix, see services.throttle).
_SLOW_DOWN = {
    "token": _(
        "Brex asked this site to slow down (Retry-After): nothing asks Brex to refresh tokens "
        "before %(when)s."
    ),
    "revocation": _(
        "Brex asked this site to slow down (Retry-After): nothing asks Brex to revoke tokens "
        "before %(when)s."
    ),
}


def brex_notices() -> list[tuple[str, str]]:
    """What staff must know about talking to Brex right now, as (level, text) for the
    connections list and the health page: the client pause (an error) and any Retry-After
    still running."""
    notices: list[tuple[str, str]] = []
    api_waits = []
    for wait in throttle.active_waits():
        kind = wait.scope.split(":", 1)[0]
        if wait.reason == ThrottleReason.CLIENT_REJECTED:
            notices.append(("error", gettext(
                "Refreshing is paused for every connection since %(since)s: %(detail)s. "
                "Connections stay active and customers need not reconnect. Fix CLIENT_ID / "
                "CLIENT_SECRET in BREX_OAUTH; refreshing resumes by itself once they work "
                "(next check %(next)s, or run manage.py brex_oauth_check)."
            ) % {"since": when(wait.since), "detail": wait.detail,
                 "next": when(wait.not_before)}))
        elif kind == "api":
            api_waits.append(wait)
        else:
            text = _SLOW_DOWN.get(kind) or gettext(
                "Brex asked this site to slow down (Retry-After): nothing is sent to Brex "
                "(%(kind)s) before %(when)s."
            )
            notices.append(("warning", str(text) % {
                "kind": kind, "when": when(wait.not_before)
            }))
    if api_waits:
        # A Retry-After wait always has its end (active_waits() asks for one to come).
        latest = max(
            (wait.not_before for wait in api_waits if wait.not_before is not None),
            default=None,
        )
        notices.append(("warning", ngettext(
            "Brex asked this site to slow down (Retry-After) for %(count)s Brex account: its "
            "API calls wait until %(when)s at the latest.",
            "Brex asked this site to slow down (Retry-After) for %(count)s Brex accounts: "
            "their API calls wait until %(when)s at the latest.",
            len(api_waits),
        ) % {"count": len(api_waits), "when": when(latest)}))
    return notices


def when(value) -> str:
    """A time as every page of the admin shows one: Django's localized ``DATETIME_FORMAT``
    in the current time zone, as for the model's own date fields; :data:`EMPTY` for None."""
    if value is None:
        return EMPTY
    return formats.date_format(timezone.localtime(value), "DATETIME_FORMAT")


def days(count: int) -> str:
    return ngettext("%(count)s day", "%(count)s days", count) % {"count": count}
