"""The Django admin: what staff see (never a token), filters, search, actions, permissions."""

from __future__ import annotations

import re
from datetime import datetime, time, timedelta

import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.db import connection as db_connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import formats, timezone

from django_brex_oauth.models import (
    AuthorizationRequest,
    BrexConnection,
    BrexToken,
    ConnectionEvent,
    ConnectionStatus,
    DetachedRevocation,
    RevocationStatus,
)
from django_brex_oauth.services.connect import start_authorization
from django_brex_oauth.testing.factories import make_connection

pytestmark = pytest.mark.django_db(transaction=True)

CHANGELIST = "admin:brex_oauth_brexconnection_changelist"

#: Queries of one connection changelist page, whatever the number of rows: the session,
#: the user, the paginator's count, the unfiltered count ("3 of 200"), and the page of
#: connections with their owners and token expiries joined in, and the waits Brex asked for
#: (the banner).
CHANGELIST_QUERIES = 6


def breadcrumbs(page: str) -> list[str]:
    """The admin's breadcrumb texts, in order: Django 5.2 writes them in a
    ``<div class="breadcrumbs">`` joined by ``&rsaquo;``, Django 6 as an ``<ol>`` of ``<li>``."""
    found = re.search(
        r'<(div|ol) class="breadcrumbs">(.*?)</\1>', page, re.S
    )
    assert found, "no breadcrumbs on the page"
    parts = re.split(r"<[^>]+>|&rsaquo;|\u203a", found.group(2))
    return [" ".join(part.split()) for part in parts if part.strip()]


def readonly_value(page: str, field: str) -> str:
    """The text of a read-only field on an admin change page (its help text left out, which
    Django 6 writes between the label and the value)."""
    row = re.search(rf'<div class="form-row field-{field}">(.*?)<div class="readonly">(.*?)</div>',
                    page, re.S)
    assert row, f"no read-only field {field} on the page"
    return " ".join(re.sub(r"<[^>]+>", " ", row.group(2)).split())


@pytest.fixture
def admin_client(client, staff_user):
    client.force_login(staff_user)
    return client


def staff_with(django_user_model, client, *codenames: str):
    """A staff member with only the given brex_oauth permissions, signed in on ``client``."""
    member = django_user_model.objects.create_user(
        f"staff-{'-'.join(codenames) or 'none'}", "staff@example.com", "pw", is_staff=True
    )
    member.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="brex_oauth", codename__in=codenames)
    )
    client.force_login(member)
    return member


def changelist(client, **params):
    return client.get(reverse(CHANGELIST), params)


def listed_pks(response) -> set[int]:
    return {row.pk for row in response.context["cl"].result_list}


def messages_of(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def action_names(response) -> list[str]:
    form = response.context["action_form"]
    if form is None:
        return []
    return [name for name, _label in form.fields["action"].choices if name]


def run_action(client, action: str, connections, *, follow: bool = True):
    return client.post(
        reverse(CHANGELIST),
        {"action": action, "_selected_action": [c.pk for c in connections]},
        follow=follow,
    )


# The list ------------------------------------------------------------------------------


def test_the_changelist_shows_each_connection_and_its_tokens_state(
    admin_client, user, fake_brex, brex_settings
):
    connection = make_connection(user, fake=fake_brex)
    refreshed_at = timezone.now() - timedelta(hours=3)
    BrexToken.objects.filter(pk=connection.pk).update(
        refresh_token_issued_at=timezone.now() - timedelta(days=12, hours=1),
        refresh_token_expires_at=timezone.now() + timedelta(days=77, hours=23),
    )
    BrexConnection.objects.filter(pk=connection.pk).update(
        last_error="Refresh failed, will retry: Brex token endpoint answered HTTP 503",
        last_refreshed_at=refreshed_at,
    )
    response = changelist(admin_client)
    assert response.status_code == 200
    page = response.content.decode()
    # Five columns an operator needs, the environment and the last error merged in; scopes,
    # the access token's expiry and the refresh token chain's age are on the connection's
    # page.
    headers = re.findall(r'<th scope="col" class="(?:sortable )?column-(\w+)', page)
    assert headers == ["brex_account", "owner", "status_and_error",
                       "refresh_token_days_left", "last_refreshed"]
    for header in ("Brex account", "Owner", "Status", "Refresh token ends", "Last refreshed"):
        assert f">{header}</a>" in page or f">{header}</span>" in page, header
    row = re.search(r'<tr>\s*<td class="action-checkbox">.*?</tr>', page, re.S).group(0)
    cells = dict(re.findall(r'<t[hd] class="field-(\w+)[^"]*">(.*?)</t[hd]>', row, re.S))
    assert re.sub(r"<a [^>]+>", "<a>", cells["brex_account"]) == (
        '<a>Acme Rockets, Inc.<br><span class="quiet">Staging · ada.lovelace@example.com'
        "</span></a>"
    )
    assert cells["owner"] == "ada"
    assert cells["status_and_error"] == (
        'Active<br><span class="quiet">Refresh failed, will retry: Brex token endpoint '
        "answered HTTP 503</span>"
    )
    assert cells["refresh_token_days_left"] == "in about 77 days"
    assert "users.readonly" not in row
    # Times read as everywhere else in the admin: Django's localized DATETIME_FORMAT.
    assert cells["last_refreshed"] == formats.date_format(
        timezone.localtime(refreshed_at), "DATETIME_FORMAT"
    )
    # A view of the list, not an edit: the title says so, and the breadcrumb names the app.
    assert "<h1>Select Brex connection to view</h1>" in page
    assert "<title>Select Brex connection to view |" in page
    assert breadcrumbs(page) == ["Home", "Brex OAuth", "Brex connections"]


def test_the_connection_page_shows_one_time_format_and_the_tokens_state(
    admin_client, user, fake_brex, brex_settings
):
    connection = make_connection(user, fake=fake_brex)
    issued = timezone.now() - timedelta(days=12, hours=1)
    ends = timezone.now() + timedelta(days=77, hours=23)
    BrexToken.objects.filter(pk=connection.pk).update(
        refresh_token_issued_at=issued, refresh_token_expires_at=ends
    )
    page = admin_client.get(
        reverse("admin:brex_oauth_brexconnection_change", args=[connection.pk])
    ).content.decode()
    text = " ".join(re.sub(r"<[^>]+>", " ", page).split())
    localized = lambda value: formats.date_format(  # noqa: E731
        timezone.localtime(value), "DATETIME_FORMAT"
    )
    expires = BrexToken.objects.get(pk=connection.pk).access_token_expires_at
    assert f"Access token expires: {localized(expires)}" in text
    assert f"Refresh token chain issued: {localized(issued)} (12 days ago, at the last connect)" \
        in text
    assert (f"Refresh token expires (estimate): {localized(ends)} (77 days left, reckoned from "
            "the last refresh; Brex does not say)") in text
    assert f"Connected at: {localized(connection.connected_at)}" in text
    assert "Granted scopes:" in text
    assert readonly_value(page, "granted_scopes") == (
        "openid offline_access users.readonly companies.readonly"
    )
    # One format: nothing in the ISO-like format the token fields used to have.
    assert not re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", text)


def test_a_revoked_connection_shows_no_refresh_token_end(admin_client, user, fake_brex,
                                                         brex_settings):
    connection = make_connection(user, fake=fake_brex, status="revoked")
    BrexToken.objects.filter(pk=connection.pk).update(
        refresh_token_expires_at=timezone.now() + timedelta(days=60)
    )
    row = re.search(r'<tr>\s*<td class="action-checkbox">.*?</tr>',
                    changelist(admin_client).content.decode(), re.S).group(0)
    assert re.search(r'<td class="field-refresh_token_days_left">—</td>', row)
    assert "Revoked at Brex" in row and "(revoked at Brex)" not in row
    page = admin_client.get(
        reverse("admin:brex_oauth_brexconnection_change", args=[connection.pk])
    ).content.decode()
    text = " ".join(re.sub(r"<[^>]+>", " ", page).split())
    assert "Refresh token expires (estimate): —" in text
    assert "Access token expires: —" in text


def test_the_list_reads_to_view_whatever_the_permissions(client, django_user_model):
    for codenames in (("view_brexconnection",), ("view_brexconnection",
                                                  "change_brexconnection")):
        staff_with(django_user_model, client, *codenames)
        page = changelist(client).content.decode()
        assert "<h1>Select Brex connection to view</h1>" in page
        assert "to change" not in page


@pytest.mark.parametrize("rows", [20, 200])
def test_the_changelist_runs_a_fixed_number_of_queries(
    admin_client, django_user_model, rows, fake_brex, brex_settings
):
    owners = django_user_model.objects.bulk_create(
        [django_user_model(username=f"owner{i}", email=f"owner{i}@example.com")
         for i in range(rows)]
    )
    for owner in owners:
        connection = make_connection(owner)
        ConnectionEvent.objects.create(connection=connection, kind="connected", actor=owner)
    admin_client.get(reverse(CHANGELIST))  # warm the content-type and permission caches

    for params in ({}, {"expiring": "any"}, {"status__exact": "active", "q": "owner1"}):
        with CaptureQueriesContext(db_connection) as queries:
            response = admin_client.get(reverse(CHANGELIST), params)
        assert response.status_code == 200
        if not params:
            assert len(response.context["cl"].result_list) == min(rows, 100)
        assert len(queries) == CHANGELIST_QUERIES, "\n".join(q["sql"] for q in queries)


def test_the_expiring_soon_filter(admin_client, user, fake_brex, brex_settings):
    healthy = make_connection(user, fake=fake_brex)
    ending = make_connection(user, fake=fake_brex, brex_user="grace.hopper@example.com")
    BrexToken.objects.filter(pk=ending.pk).update(
        refresh_token_expires_at=timezone.now() + timedelta(days=5)
    )
    stale = make_connection(user, fake=fake_brex, expired=True,
                            brex_user="alan.turing@example.com")
    revoked = make_connection(user, fake=fake_brex, status="revoked",
                              brex_user="katherine.johnson@example.com")
    BrexToken.objects.filter(pk=revoked.pk).update(
        refresh_token_expires_at=timezone.now() + timedelta(days=1),
        access_token_expires_at=timezone.now() - timedelta(days=1),
    )

    assert listed_pks(changelist(admin_client)) == {healthy.pk, ending.pk, stale.pk, revoked.pk}
    assert listed_pks(changelist(admin_client, expiring="any")) == {ending.pk, stale.pk}
    assert listed_pks(changelist(admin_client, expiring="refresh_token")) == {ending.pk}
    assert listed_pks(changelist(admin_client, expiring="access_token")) == {stale.pk}
    page = changelist(admin_client).content.decode()
    assert "Refresh token ends within 14 days, or access token expired" in page


def test_filters_by_status_and_environment(admin_client, user, fake_brex, brex_settings):
    active = make_connection(user, fake=fake_brex)
    broken = make_connection(user, fake=fake_brex, status="needs_reauth",
                             brex_user="grace.hopper@example.com")
    BrexConnection.objects.filter(pk=broken.pk).update(environment="production")
    assert listed_pks(changelist(admin_client, status__exact="needs_reauth")) == {broken.pk}
    assert listed_pks(changelist(admin_client, status__exact="active")) == {active.pk}
    assert listed_pks(changelist(admin_client, environment__exact="staging")) == {active.pk}


def test_search_by_owner_brex_user_and_company(
    admin_client, user, other_user, fake_brex, brex_settings
):
    mine = make_connection(user, fake=fake_brex)
    theirs = make_connection(other_user, brex_user="cuuser_searchable")
    # A fixed company id: the factory's random hex one may hold "ada" and match that search.
    BrexConnection.objects.filter(pk=theirs.pk).update(
        brex_company_name="Globex Corporation", brex_user_email="hank@globex.example",
        brex_company_id="cuacc_globex",
    )
    for term, expected in (
        ("ada", {mine.pk}),  # owner username
        ("bob@example.com", {theirs.pk}),  # owner email
        ("cuuser_searchable", {theirs.pk}),  # Brex user id
        ("hank@globex", {theirs.pk}),  # Brex user email
        ("Globex", {theirs.pk}),  # company
        ("Acme Rockets", {mine.pk}),
    ):
        assert listed_pks(changelist(admin_client, q=term)) == expected, term


# No token anywhere -----------------------------------------------------------------------


def test_no_token_value_appears_on_any_admin_page(
    admin_client, staff_user, user, fake_brex, brex_settings
):
    connections = [
        make_connection(user, fake=fake_brex),
        make_connection(user, fake=fake_brex, expired=True, brex_user="grace.hopper@example.com"),
        make_connection(user, fake=fake_brex, status="needs_reauth",
                        brex_user="alan.turing@example.com"),
    ]
    secrets: dict[str, str] = {}
    for connection in connections:
        token = BrexToken.objects.get(pk=connection.pk)
        for name in ("access_token", "refresh_token"):
            if getattr(token, name):
                secrets[f"{name} of #{connection.pk}"] = getattr(token, name)
    # Events of every kind staff will meet: a refresh (the new tokens are secrets too), a
    # failed and a successful revocation.
    run_action(admin_client, "refresh_now", [connections[1]])
    refreshed = BrexToken.objects.get(pk=connections[1].pk)
    secrets["rotated access token"] = refreshed.access_token
    secrets["rotated refresh token"] = refreshed.refresh_token
    fake_brex.fail_next("/v1/revoke", status=503, times=100)
    run_action(admin_client, "revoke_at_brex", [connections[0]])
    # Pending authorizations: their state, nonce and PKCE verifier.
    for _ in range(2):
        auth_request, _url = start_authorization(user=user, redirect_uri="http://testserver/cb/")
        secrets[f"verifier {auth_request.pk}"] = auth_request.code_verifier
        secrets[f"state {auth_request.pk}"] = auth_request.state
        secrets[f"nonce {auth_request.pk}"] = auth_request.nonce
    assert ConnectionEvent.objects.filter(kind="refreshed").exists()
    assert ConnectionEvent.objects.filter(kind="revoke_failed").exists()

    urls = [
        reverse(CHANGELIST),
        reverse(CHANGELIST) + "?q=ada",
        reverse("admin:brex_oauth_connectionevent_changelist"),
        reverse("admin:brex_oauth_authorizationrequest_changelist"),
        reverse("admin:index"),
        reverse("admin:app_list", args=["brex_oauth"]),
    ]
    for connection in connections:
        urls += [
            reverse("admin:brex_oauth_brexconnection_change", args=[connection.pk]),
            reverse("admin:brex_oauth_brexconnection_history", args=[connection.pk]),
        ]
    for event in ConnectionEvent.objects.all():
        urls.append(reverse("admin:brex_oauth_connectionevent_change", args=[event.pk]))
    for auth_request in AuthorizationRequest.objects.all():
        urls.append(reverse("admin:brex_oauth_authorizationrequest_change",
                            args=[auth_request.pk]))

    pages_seen = 0
    for url in urls:
        response = admin_client.get(url)
        assert response.status_code == 200, url
        page = response.content.decode()
        pages_seen += 1
        for name, value in secrets.items():
            assert value not in page, f"the {name} appears on {url}"
    assert pages_seen == len(urls) > 10
    change_page = admin_client.get(
        reverse("admin:brex_oauth_brexconnection_change", args=[connections[1].pk])
    ).content.decode()
    assert "Tokens (values are never shown)" in change_page
    assert "Tokens refreshed" in change_page  # the event inline is there

    # BrexToken has no admin page at all.
    assert not any("brextoken" in url for url in urls)
    assert admin_client.get("/admin/brex_oauth/brextoken/").status_code == 404


# Read-only and permissions -----------------------------------------------------------------


def test_connections_cannot_be_added_or_edited_by_hand(admin_client, user, fake_brex,
                                                       brex_settings):
    connection = make_connection(user, fake=fake_brex)
    assert admin_client.get(reverse("admin:brex_oauth_brexconnection_add")).status_code == 403
    url = reverse("admin:brex_oauth_brexconnection_change", args=[connection.pk])
    page = admin_client.get(url).content.decode()
    assert 'name="_save"' not in page
    assert 'name="status"' not in page
    response = admin_client.post(url, {"status": "active", "owner": user.pk})
    assert response.status_code == 403
    # Deleting is for connections Brex has confirmed revoked; never in bulk.
    delete = reverse("admin:brex_oauth_brexconnection_delete", args=[connection.pk])
    assert admin_client.get(delete).status_code == 403
    assert action_names(changelist(admin_client)) == ["revoke_at_brex", "refresh_now"]
    revoked = make_connection(user, status="revoked", brex_user="cuuser_gone")
    assert revoked.revocation_status == RevocationStatus.DONE
    delete = reverse("admin:brex_oauth_brexconnection_delete", args=[revoked.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 302
    assert not BrexConnection.objects.filter(pk=revoked.pk).exists()


def test_the_event_log_and_authorizations_are_read_only(admin_client, user, fake_brex,
                                                        brex_settings):
    connection = make_connection(user, fake=fake_brex)
    event = ConnectionEvent.objects.create(connection=connection, kind="connected")
    for name in ("connectionevent", "authorizationrequest"):
        assert admin_client.get(reverse(f"admin:brex_oauth_{name}_add")).status_code == 403
    url = reverse("admin:brex_oauth_connectionevent_change", args=[event.pk])
    assert admin_client.post(url, {"kind": "revoked"}).status_code == 403
    assert ConnectionEvent.objects.get(pk=event.pk).kind == "connected"
    # Pending authorizations expire and are pruned; nobody deletes one mid-flow by hand.
    pending = AuthorizationRequest.objects.create(
        user=user, state="s" * 43, environment="staging", code_verifier="v" * 43,
        nonce="n" * 32, redirect_uri="http://testserver/brex/callback/",
        requested_scopes="openid offline_access users.readonly",
        expires_at=timezone.now() + timedelta(minutes=10),
    )
    delete = reverse("admin:brex_oauth_authorizationrequest_delete", args=[pending.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    assert AuthorizationRequest.objects.filter(pk=pending.pk).exists()


# Actions ---------------------------------------------------------------------------------


def test_revoke_at_brex_action_reports_each_connection(
    admin_client, staff_user, user, fake_brex, brex_settings
):
    live = make_connection(user, fake=fake_brex)
    gone = make_connection(user, status="revoked", brex_user="cuuser_gone")
    refresh_token = BrexToken.objects.get(pk=live.pk).refresh_token

    response = run_action(admin_client, "revoke_at_brex", [live, gone])

    assert response.status_code == 200
    reported = messages_of(response)
    assert f"Acme Rockets, Inc. (#{live.pk}): revoked at Brex; its tokens are wiped." in reported
    assert f"Example Company, Inc. (#{gone.pk}): was revoked at Brex already." in reported
    live.refresh_from_db()
    assert live.status == ConnectionStatus.REVOKED
    assert live.revocation_status == RevocationStatus.DONE
    assert not fake_brex.is_refresh_token_active(refresh_token)
    assert ConnectionEvent.objects.get(connection=live, kind="disconnected").actor == staff_user


def test_revoke_at_brex_action_when_brex_is_down(admin_client, user, fake_brex, brex_settings):
    brex_settings.BREX_OAUTH = {**brex_settings.BREX_OAUTH, "REVOKE_TASK_MAX_RETRIES": 0}
    older = make_connection(user, fake=fake_brex, brex_user="grace.hopper@example.com")
    newer = make_connection(user, fake=fake_brex)
    fake_brex.fail_next("/v1/revoke", status=503, times=100)

    reported = messages_of(run_action(admin_client, "revoke_at_brex", [older, newer]))

    # The list is newest first: ``newer`` is tried at once and fails, so ``older`` is not
    # kept waiting on Brex; both revocations go to the task (one try each here).
    assert len(reported) == 2
    assert reported[0].startswith(f"Acme Rockets, Inc. (#{newer.pk}): disconnected here, "
                                  "but Brex did not confirm the revocation")
    assert "HTTP 503" in reported[0]
    assert "it will be retried shortly" in reported[0]
    assert reported[1] == (f"Acme Rockets, Inc. (#{older.pk}): disconnected here; Brex is not "
                           "answering, so its revocation is queued.")
    tokens_sent = [r["form"]["token"] for r in fake_brex.requests
                   if r["path"].endswith("/v1/revoke")]
    newer_token = BrexToken.objects.get(pk=newer.pk).refresh_token
    older_token = BrexToken.objects.get(pk=older.pk).refresh_token
    assert tokens_sent == [newer_token, newer_token, older_token]
    for connection in (newer, older):
        connection.refresh_from_db()
        assert connection.status == ConnectionStatus.REVOKED
        assert connection.revocation_status == RevocationStatus.PENDING


def test_revoke_needs_the_revoke_permission(client, django_user_model, user, fake_brex,
                                            brex_settings):
    connection = make_connection(user, fake=fake_brex)
    staff_with(django_user_model, client, "view_brexconnection", "change_brexconnection")
    assert action_names(changelist(client)) == ["refresh_now"]
    response = run_action(client, "revoke_at_brex", [connection])
    assert response.status_code == 200
    assert BrexConnection.objects.get(pk=connection.pk).status == ConnectionStatus.ACTIVE
    assert fake_brex.stats["revocations"] == 0

    staff_with(django_user_model, client, "view_brexconnection", "revoke_brexconnection")
    assert action_names(changelist(client)) == ["revoke_at_brex"]
    run_action(client, "revoke_at_brex", [connection])
    assert BrexConnection.objects.get(pk=connection.pk).status == ConnectionStatus.REVOKED
    assert fake_brex.stats["revocations"] == 1


def test_refresh_now_action_reports_each_connection(admin_client, user, fake_brex,
                                                    brex_settings):
    fresh = make_connection(user, fake=fake_brex)
    broken = make_connection(user, fake=fake_brex, status="needs_reauth",
                             brex_user="grace.hopper@example.com")
    before = BrexToken.objects.get(pk=fresh.pk)

    response = run_action(admin_client, "refresh_now", [fresh, broken])

    reported = messages_of(response)
    assert any(m.startswith(f"Acme Rockets, Inc. (#{fresh.pk}): refreshed; the access token "
                            "is valid until") and m.endswith("the refresh token was rotated.")
               for m in reported), reported
    assert (f"Acme Rockets, Inc. (#{broken.pk}): not refreshed; its status is "
            '"Needs re-authorization".') in reported
    after = BrexToken.objects.get(pk=fresh.pk)
    assert after.access_token != before.access_token
    assert fake_brex.is_access_token_active(after.access_token)
    assert fake_brex.stats["token_refresh_token"] == 1


def test_refresh_now_when_brex_is_down_or_refuses(admin_client, user, fake_brex,
                                                  brex_settings):
    # The list is newest first, so the first request to Brex is for ``down``.
    refused = make_connection(user, fake=fake_brex, brex_user="grace.hopper@example.com")
    down = make_connection(user, fake=fake_brex)
    fake_brex.expire_refresh_token(BrexToken.objects.get(pk=refused.pk).refresh_token)
    fake_brex.fail_next("/v1/token", status=503)

    reported = messages_of(run_action(admin_client, "refresh_now", [down, refused]))

    assert any(m.startswith(f"Acme Rockets, Inc. (#{down.pk}): not refreshed:") and "503" in m
               for m in reported), reported
    assert (f"Acme Rockets, Inc. (#{refused.pk}): Brex refused the refresh token; the customer "
            "must connect again.") in reported
    assert BrexConnection.objects.get(pk=down.pk).status == ConnectionStatus.ACTIVE
    assert BrexConnection.objects.get(pk=refused.pk).status == ConnectionStatus.NEEDS_REAUTH


def test_refresh_now_needs_the_change_permission(client, django_user_model, user, fake_brex,
                                                 brex_settings):
    connection = make_connection(user, fake=fake_brex)
    staff_with(django_user_model, client, "view_brexconnection")
    response = changelist(client)
    assert response.status_code == 200
    assert action_names(response) == []
    run_action(client, "refresh_now", [connection])
    assert fake_brex.stats["token_refresh_token"] == 0

    # With view permission only, the change page is there, read-only, with its event log.
    ConnectionEvent.objects.create(connection=connection, kind="connected")
    page = client.get(
        reverse("admin:brex_oauth_brexconnection_change", args=[connection.pk])
    ).content.decode()
    assert "Connected" in page and 'name="_save"' not in page


def test_staff_without_any_permission_see_nothing(client, django_user_model, user,
                                                  fake_brex, brex_settings):
    connection = make_connection(user, fake=fake_brex)
    staff_with(django_user_model, client)
    assert changelist(client).status_code == 403
    url = reverse("admin:brex_oauth_brexconnection_change", args=[connection.pk])
    assert client.get(url).status_code == 403


def test_status_column_says_where_the_revocation_stands(user):
    from django.contrib.admin.sites import site

    model_admin = site._registry[BrexConnection]
    connection = make_connection(user, status="revoked")
    assert model_admin.status_display(connection) == "Revoked at Brex"
    connection.revocation_status = RevocationStatus.PENDING
    assert model_admin.status_display(connection) == "Revoked, pending at Brex"
    connection.revocation_status = RevocationStatus.NOT_POSSIBLE
    assert model_admin.status_display(connection) == "Revoked, Brex could not be told"
    connection.revocation_status = RevocationStatus.NOT_REQUESTED
    assert model_admin.status_display(connection) == "Revoked"
    connection.status = ConnectionStatus.NEEDS_REAUTH
    assert model_admin.status_display(connection) == "Needs re-authorization"


def test_refresh_now_commits_at_once_under_atomic_requests(
    admin_client, user, fake_brex, brex_settings, atomic_requests
):
    from django_brex_oauth.services import refresh

    seen = atomic_requests.watch(refresh, "refresh_connection")
    connection = make_connection(user, fake=fake_brex)
    before = BrexToken.objects.get(pk=connection.pk).refresh_token

    run_action(admin_client, "refresh_now", [connection])

    assert seen == [False]
    assert BrexToken.objects.get(pk=connection.pk).refresh_token != before


def test_get_actions_names_djangos_action_location_argument():
    # Django 6.1 passes action_location only to a get_actions() whose signature names it;
    # any other override is deprecated there and loses its actions on the change form.
    import inspect

    from django_brex_oauth.admin import BrexConnectionAdmin

    assert "action_location" in inspect.signature(BrexConnectionAdmin.get_actions).parameters


# The health page ---------------------------------------------------------------------------

HEALTH = "admin:brex_oauth_health"

#: Queries of the health page, whatever the number of connections: the session, the user,
#: connections by status, refreshes per day, the oldest refresh tokens, the pending
#: revocations, the deleted connections' revocations and their count, the last sweep, the
#: lag, and the waits Brex asked for (the banner).
HEALTH_QUERIES = 11


def bulk_connections(django_user_model, count: int, *, prefix: str = "bulk") -> list[int]:
    """``count`` connections in a few queries: active ones with token bookkeeping (no token
    value), every tenth revoked and pending at Brex, every twentieth needing re-auth."""
    now = timezone.now()
    django_user_model.objects.bulk_create(
        [django_user_model(username=f"{prefix}{i}") for i in range(count)]
    )
    owners = list(django_user_model.objects.filter(username__startswith=prefix).order_by("pk"))
    connections = BrexConnection.objects.bulk_create(
        BrexConnection(
            owner=owner, environment="staging", brex_user_id=f"cuuser_{prefix}{i}",
            brex_company_name=f"Company {i}",
            status=("revoked" if i % 10 == 0 else "needs_reauth" if i % 20 == 5 else "active"),
            revocation_status="pending" if i % 10 == 0 else "",
            revoked_at=now - timedelta(hours=i) if i % 10 == 0 else None,
        )
        for i, owner in enumerate(owners)
    )
    BrexToken.objects.bulk_create(
        BrexToken(
            connection=connection,
            access_token_expires_at=(
                now + timedelta(minutes=30) if connection.status == "active" else None
            ),
            refresh_token_issued_at=now - timedelta(days=30),
            refresh_token_used_at=now - timedelta(days=i % 80),
            refresh_token_expires_at=now + timedelta(days=90 - i % 80),
        )
        for i, connection in enumerate(connections)
    )
    ConnectionEvent.objects.bulk_create(
        ConnectionEvent(
            connection=connection,
            kind="refreshed" if i % 7 else "refresh_failed",
            created_at=now - timedelta(days=i % 40),
        )
        for i, connection in enumerate(connections)
    )
    DetachedRevocation.objects.bulk_create(
        DetachedRevocation(
            token=f"t{i}", environment="staging", former_connection_id=100000 + i,
            brex_user_id=f"cuuser_gone{i}",
        )
        for i in range(max(1, count // 100))
    )
    return [connection.pk for connection in connections]


def test_the_health_page_is_linked_from_the_app_index_and_the_list(
    admin_client, client, django_user_model
):
    url = reverse(HEALTH)
    assert url == "/admin/brex_oauth/brexconnection/health/"
    app_index = admin_client.get(reverse("admin:app_list", args=["brex_oauth"]))
    assert f'href="{url}"' in app_index.content.decode()
    assert f'href="{url}"' in changelist(admin_client).content.decode()
    # Staff who may only read the event log are not offered a page they cannot open.
    staff_with(django_user_model, client, "view_connectionevent")
    app_index = client.get(reverse("admin:app_list", args=["brex_oauth"]))
    assert app_index.status_code == 200
    assert "Brex connection events" in app_index.content.decode()
    assert f'href="{url}"' not in app_index.content.decode()


@pytest.mark.parametrize("rows", [20, 2000])
def test_the_health_page_runs_a_fixed_number_of_queries(admin_client, django_user_model, rows):
    bulk_connections(django_user_model, rows)
    admin_client.get(reverse(HEALTH))  # warm the content-type and permission caches
    with CaptureQueriesContext(db_connection) as queries:
        response = admin_client.get(reverse(HEALTH))
    assert response.status_code == 200
    assert response.context["snapshot"].total == rows
    assert len(queries) == HEALTH_QUERIES, "\n".join(q["sql"] for q in queries)


def health_page(client) -> str:
    response = client.get(reverse(HEALTH))
    assert response.status_code == 200
    return response.content.decode()


def section(page: str, element_id: str) -> str:
    """The text of the module ``element_id`` of the health page, tags and spaces squeezed."""
    html = re.search(rf'<div class="module" id="{element_id}">(.*?)\n  </div>', page, re.S)
    assert html, element_id
    return " ".join(re.sub(r"<[^>]+>", " ", html.group(1)).split())


def test_the_health_page_needs_staff_and_the_view_permission(
    client, django_user_model, user
):
    url = reverse(HEALTH)
    # Not signed in, or signed in without is_staff: the admin's login page.
    response = client.get(url)
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")
    client.force_login(user)
    response = client.get(url)
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")
    # Staff who may not see connections: refused.
    staff_with(django_user_model, client)
    assert client.get(url).status_code == 403
    staff_with(django_user_model, client, "view_connectionevent")
    assert client.get(url).status_code == 403
    # The view or the change permission of connections opens it.
    for codename in ("view_brexconnection", "change_brexconnection"):
        staff_with(django_user_model, client, codename)
        assert "Health of the Brex connections" in health_page(client)


def test_the_health_page_counts_connections_by_status_and_lists_what_needs_care(
    admin_client, django_user_model, user, fake_brex, brex_settings
):
    now = timezone.now()
    active = make_connection(user, fake=fake_brex)
    BrexToken.objects.filter(pk=active.pk).update(
        refresh_token_used_at=now - timedelta(days=85),
        refresh_token_expires_at=now + timedelta(days=5, hours=1),
    )
    fresh = make_connection(user, fake=fake_brex, brex_user="grace.hopper@example.com")
    make_connection(user, status="needs_reauth", brex_user="cuuser_broken")
    pending = make_connection(user, status="revoked", brex_user="cuuser_pending")
    BrexConnection.objects.filter(pk=pending.pk).update(
        revocation_status=RevocationStatus.PENDING, revocation_attempts=3,
        last_error="Revocation at Brex failed: HTTP 503",
    )
    make_connection(user, status="revoked", brex_user="cuuser_done")
    DetachedRevocation.objects.create(
        token="a-secret-refresh-token", environment="staging", former_connection_id=4242,
        brex_user_id="cuuser_deleted", attempts=2, last_error="HTTP 502",
    )

    page = health_page(admin_client)

    assert section(page, "brex-health-status") == (
        "Connections by status (5 connections) Status Connections "
        "Active 2 Needs re-authorization 1 Revoked 2"
    )
    # Active connections only, the one nearest the end of its refresh token first.
    oldest_html = re.search(r'id="brex-health-oldest">(.*?)</table>', page, re.S).group(1)
    listed = [int(pk) for pk in re.findall(r"/brexconnection/(\d+)/change/", oldest_html)]
    assert listed == [active.pk, fresh.pk]
    oldest = section(page, "brex-health-oldest")
    assert "(5 days left)" in oldest and "(89 days left)" in oldest
    revocations = section(page, "brex-health-revocations")
    assert "Revoked here, pending at Brex 1" in revocations
    assert "Revoked here, Brex could not be told 0" in revocations
    assert "Deleted connections whose token is still to revoke 1" in revocations
    assert f"Example Company, Inc. (#{pending.pk}) (Staging)" in revocations
    assert "Revocation at Brex failed: HTTP 503" in revocations
    assert "Deleted connection #4242 (cuuser_deleted)" in revocations
    assert "a-secret-refresh-token" not in page
    for secret in BrexToken.objects.values_list("refresh_token", flat=True):
        assert not secret or secret not in page


def test_the_health_chart_shows_refreshes_and_failures_per_day(admin_client, user):
    connection = make_connection(user)
    today = timezone.localtime().date()

    def early_on(days_ago: int):
        """A second after the local midnight that began the day ``days_ago`` days ago."""
        day = today - timedelta(days=days_ago)
        return timezone.make_aware(datetime.combine(day, time(0, 0, 1)))

    for days_ago, kind, count in (
        (0, "refreshed", 4), (0, "refresh_failed", 1), (2, "refreshed", 10),
        (2, "needs_reauth", 2), (29, "refreshed", 1), (30, "refreshed", 50),  # too old
        (1, "connected", 7),  # not a refresh
    ):
        ConnectionEvent.objects.bulk_create(
            ConnectionEvent(connection=connection, kind=kind,
                            created_at=early_on(days_ago))
            for _ in range(count)
        )

    page = health_page(admin_client)
    svg = re.search(r'<svg class="brex-chart".*?</svg>', page, re.S).group(0)

    bars = {
        (kind, day): int(count)
        for kind, day, count in re.findall(
            r'<rect class="(\w+)"[^>]* data-day="([\d-]+)" data-count="(\d+)"', svg
        )
    }
    assert len(bars) == 60  # 30 days, two bars each
    day = lambda n: (today - timedelta(days=n)).isoformat()  # noqa: E731
    assert bars[("refreshed", day(0))] == 4 and bars[("failed", day(0))] == 1
    assert bars[("refreshed", day(2))] == 10 and bars[("failed", day(2))] == 2
    assert bars[("refreshed", day(29))] == 1
    assert bars[("refreshed", day(1))] == bars[("failed", day(1))] == 0
    assert day(30) not in {bar_day for _kind, bar_day in bars}
    assert sum(bars[key] for key in bars if key[0] == "refreshed") == 15
    assert sum(bars[key] for key in bars if key[0] == "failed") == 3
    # The tallest bar reaches the top of the scale (10), the others in proportion.
    heights = {
        (kind, bar_day): float(height)
        for kind, height, bar_day in re.findall(
            r'<rect class="(\w+)"[^>]* height="([\d.]+)" data-day="([\d-]+)"', svg
        )
    }
    assert heights[("refreshed", day(2))] == pytest.approx(2.5 * heights[("refreshed", day(0))])
    assert heights[("refreshed", day(1))] == 0
    # Accessible: a title, a description with the totals, a tooltip per bar, a table.
    assert 'role="img"' in svg and "<title id=\"brex-chart-title\">" in svg
    assert "15 refreshes and 3 failures" in svg
    two_days_ago = formats.date_format(today - timedelta(days=2), "M j")
    assert f"<title>{two_days_ago}: 10 refreshes</title>" in svg
    table = re.search(r'<table id="brex-health-days">.*?</table>', page, re.S).group(0)
    cells = [" ".join(re.sub(r"<[^>]+>", " ", row).split())
             for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)[1:]]
    assert len(cells) == 30
    assert cells[-1].endswith(" 4 1 0")
    assert cells[-3].endswith(" 10 2 2")
    assert "Refreshes (15)" in page and "Failures (3)" in page


def test_the_health_page_shows_when_the_sweep_last_ran_and_its_lag(
    admin_client, user, fake_brex, brex_settings
):
    from django_brex_oauth import tasks
    from django_brex_oauth.services.sweep import sweep

    make_connection(user, fake=fake_brex)
    sweep_section = section(health_page(admin_client), "brex-health-sweep")
    assert "No sweep has run since this version was installed" in sweep_section
    assert "Lag none: no active connection is overdue for a refresh" in sweep_section

    # An access token past its refresh margin: due for 15 minutes, nobody refreshed it.
    stale = make_connection(user, fake=fake_brex, brex_user="grace.hopper@example.com")
    BrexToken.objects.filter(pk=stale.pk).update(
        access_token_expires_at=timezone.now() - timedelta(minutes=5)
    )
    page = health_page(admin_client)
    assert "became due 15 minutes ago" in section(page, "brex-health-sweep")
    assert 'class="level-error">the most overdue' in page  # past REFRESH_MARGIN: expired

    # The Celery sweep records its run (here it refreshes the stale one eagerly) ...
    assert tasks.refresh_due_connections.apply().get() == 1
    sweep_section = section(health_page(admin_client), "brex-health-sweep")
    assert "Celery beat sweep; 1 connection queued or refreshed" in sweep_section
    assert "0 seconds ago" in sweep_section or "1 second ago" in sweep_section
    assert "Lag none" in sweep_section
    # ... and so does the synchronous one (manage.py brex_oauth_refresh).
    sweep()
    sweep_section = section(health_page(admin_client), "brex-health-sweep")
    assert "synchronous sweep (manage.py brex_oauth_refresh); 0 connections" in sweep_section


def test_the_health_page_shows_the_banner_when_brex_refuses_the_client(
    admin_client, brex_settings
):
    from django_brex_oauth.exceptions import TokenError
    from django_brex_oauth.services import throttle

    assert "brex-oauth-notices" not in health_page(admin_client)
    throttle.client_rejected(TokenError("invalid_client", status=401))
    page = health_page(admin_client)
    banner = re.search(r'<ul class="messagelist brex-oauth-notices">(.*?)</ul>', page, re.S)
    assert banner and 'class="error"' in banner.group(1)
    assert "Refreshing is paused for every connection since" in banner.group(1)
    assert "customers need not reconnect" in banner.group(1)
