"""The admin's health page: every connection at a glance.

Reached at ``reverse("admin:brex_oauth_health")`` (a view of the connection admin, see
``BrexConnectionAdmin.get_urls``), linked from the app's admin page and from the
connection list. The figures come from :func:`django_brex_oauth.services.health.snapshot`
in a fixed number of queries; the chart is drawn here, on the server, as SVG: no
JavaScript, a title and a description for screen readers, and the same figures as a
table beside it.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from django.core.exceptions import PermissionDenied
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import formats
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.timesince import timesince
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy, ngettext

from .admin_support import brex_notices, when
from .beat import SWEEP_INTERVAL
from .conf import brex_settings
from .models import ConnectionStatus, RevocationStatus
from .services import health

#: The chart's drawing box (SVG user units); the chart scales to the page's width.
WIDTH, HEIGHT = 720, 220
LEFT, RIGHT, TOP, BOTTOM = 44, 8, 12, 28

TITLE = gettext_lazy("Health of the Brex connections")


# The chart ---------------------------------------------------------------------------------


def nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... that is at least ``value`` (at least 1)."""
    if value <= 1:
        return 1
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5):
        if step * power >= value:
            return step * power
    return 10 * power


def _day_label(day: dt.date) -> str:
    return formats.date_format(day, "M j")


def chart_svg(days: list[health.DayCount]) -> SafeString:
    """Refreshes and failures per day as a grouped bar chart, in SVG.

    Each bar has a ``<title>`` (a tooltip, and what a screen reader says) and
    ``data-day`` / ``data-count`` attributes; the ``<desc>`` sums the period up.
    """
    top = nice_ceiling(max((max(d.refreshed, d.failed) for d in days), default=0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / max(1, len(days))
    bar = max(1.0, (slot - 3) / 2)
    gridlines = []
    for value in sorted({0, top // 2, top}):
        y = round(TOP + plot_h - plot_h * value / top, 1)
        gridlines.append(format_html(
            '<line class="grid" x1="{}" x2="{}" y1="{}" y2="{}"></line>'
            '<text class="axis" x="{}" y="{}" text-anchor="end">{}</text>',
            LEFT, WIDTH - RIGHT, y, y, LEFT - 6, y + 4, formats.number_format(value),
        ))
    bars = []
    labels = []
    for index, day in enumerate(days):
        x = LEFT + index * slot + 1.5
        for offset, kind, count, text in (
            (0.0, "refreshed", day.refreshed,
             ngettext("%(day)s: %(count)s refresh", "%(day)s: %(count)s refreshes",
                      day.refreshed)),
            (bar, "failed", day.failed,
             ngettext("%(day)s: %(count)s failure", "%(day)s: %(count)s failures",
                      day.failed)),
        ):
            height = 0.0 if not count else max(1.0, plot_h * count / top)
            bars.append(format_html(
                '<rect class="{}" x="{}" y="{}" width="{}" height="{}" data-day="{}" '
                'data-count="{}"><title>{}</title></rect>',
                kind, round(x + offset, 1), round(TOP + plot_h - height, 1), round(bar, 1),
                round(height, 1), day.day.isoformat(), count,
                text % {"day": _day_label(day.day), "count": count},
            ))
        if (len(days) - 1 - index) % 7 == 0:  # a week apart, ending today
            labels.append(format_html(
                '<text class="axis" x="{}" y="{}" text-anchor="middle">{}</text>',
                round(x + bar, 1), HEIGHT - 8, _day_label(day.day),
            ))
    return format_html(
        '<svg class="brex-chart" viewBox="0 0 {} {}" role="img" '
        'aria-labelledby="brex-chart-title brex-chart-desc" '
        'preserveAspectRatio="xMidYMid meet">'
        '<title id="brex-chart-title">{}</title><desc id="brex-chart-desc">{}</desc>'
        '{}<g class="bars">{}</g><g class="labels">{}</g></svg>',
        WIDTH, HEIGHT, _("Refreshes and failures per day"), _describe(days),
        SafeString("".join(gridlines)),
        SafeString("".join(bars)), SafeString("".join(labels)),
    )


def _describe(days: list[health.DayCount]) -> str:
    if not days:
        return ""
    refreshes = sum(d.refreshed for d in days)
    failures = sum(d.failed for d in days)
    busiest = max(days, key=lambda d: (d.refreshed, d.day))
    text = _(
        "From %(first)s to %(last)s: %(refreshes)s refreshes and %(failures)s failures."
    ) % {
        "first": _day_label(days[0].day), "last": _day_label(days[-1].day),
        "refreshes": refreshes, "failures": failures,
    }
    if busiest.refreshed:
        text += " " + _("The most refreshes in a day: %(count)s, on %(day)s.") % {
            "count": busiest.refreshed, "day": _day_label(busiest.day),
        }
    return text


# The page ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """One line of the sweep's section: a label, a value, and whether it is worrying."""

    label: str
    value: str
    level: str = ""  # "", "warning" or "error"


def duration(delta: dt.timedelta) -> str:
    """A duration as people say it: "40 seconds", "3 minutes", "2 hours, 5 minutes"."""
    seconds = int(delta.total_seconds())
    if seconds < 60:
        return ngettext("%(n)s second", "%(n)s seconds", seconds) % {"n": seconds}
    now = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
    return timesince(now - delta, now)


def sweep_readings(snap: health.Snapshot) -> list[Reading]:
    """The last sweep, the time since, and the lag, each flagged when it is worrying."""
    margin = dt.timedelta(seconds=brex_settings.REFRESH_MARGIN)
    on_time = dt.timedelta(seconds=2 * SWEEP_INTERVAL)
    readings = []
    if snap.last_sweep is None:
        readings.append(Reading(
            _("Last sweep"),
            _("No sweep has run since this version was installed: is Celery beat (or the "
              "cron job running manage.py brex_oauth_refresh) running?"),
            "error" if snap.by_status.get(ConnectionStatus.ACTIVE) else "warning",
        ))
    else:
        since = snap.since_last_sweep or dt.timedelta(0)
        readings.append(Reading(
            _("Last sweep"),
            ngettext(
                "%(when)s, %(ago)s ago (%(how)s; %(count)s connection queued or refreshed)",
                "%(when)s, %(ago)s ago (%(how)s; %(count)s connections queued or refreshed)",
                snap.last_sweep.connections,
            ) % {
                "when": when(snap.last_sweep.ran_at), "ago": duration(since),
                "how": snap.last_sweep.how, "count": snap.last_sweep.connections,
            },
            "error" if since > margin else ("warning" if since > on_time else ""),
        ))
    lag = snap.lag
    if not lag:
        value, level = _("none: no active connection is overdue for a refresh"), ""
    else:
        value = _("the most overdue connection became due %(lag)s ago") % {
            "lag": duration(lag)
        }
        level = "error" if lag > margin else ("warning" if lag > on_time else "")
    readings.append(Reading(_("Lag"), value, level))
    return readings


def status_rows(snap: health.Snapshot) -> list[tuple[str, int, str]]:
    """(label, count, link to the filtered list) per connection status."""
    url = reverse("admin:brex_oauth_brexconnection_changelist")
    return [
        (str(label), snap.by_status.get(value, 0), f"{url}?status__exact={value}")
        for value, label in ConnectionStatus.choices
    ]


def revocation_rows(snap: health.Snapshot) -> list[tuple[str, int, str]]:
    """(label, count, link) for the revocations Brex has not confirmed."""
    url = reverse("admin:brex_oauth_brexconnection_changelist")
    return [
        (_("Revoked here, pending at Brex"), snap.pending_total,
         f"{url}?revocation_status__exact={RevocationStatus.PENDING}"),
        (_("Revoked here, Brex could not be told"), snap.not_possible_total,
         f"{url}?revocation_status__exact={RevocationStatus.NOT_POSSIBLE}"),
        (_("Deleted connections whose token is still to revoke"), snap.detached_total, ""),
    ]


def health_view(model_admin, request: HttpRequest) -> TemplateResponse:
    """The health page; staff who may see connections (view or change permission)."""
    if not model_admin.has_view_or_change_permission(request):
        raise PermissionDenied
    snap = health.snapshot()
    opts = model_admin.model._meta
    context = {
        **model_admin.admin_site.each_context(request),
        "title": TITLE,
        "subtitle": None,
        "opts": opts,
        "app_label": opts.app_label,
        "snapshot": snap,
        "status_rows": status_rows(snap),
        "revocation_rows": revocation_rows(snap),
        "sweep_readings": sweep_readings(snap),
        "chart": chart_svg(snap.days),
        "brex_oauth_notices": brex_notices(),
        "list_length": health.LIST_LENGTH,
        "chart_days": health.CHART_DAYS,
    }
    request.current_app = model_admin.admin_site.name
    return TemplateResponse(request, "admin/brex_oauth/health.html", context)
