"""The Django admin: what staff see (never a token), filters, search, actions, permissions."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.db import connection as db_connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from django_brex_oauth.models import (
    AuthorizationRequest,
    BrexConnection,
    BrexToken,
    ConnectionEvent,
    ConnectionStatus,
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
    BrexToken.objects.filter(pk=connection.pk).update(
        refresh_token_issued_at=timezone.now() - timedelta(days=12, hours=1),
        refresh_token_expires_at=timezone.now() + timedelta(days=77, hours=23),
    )
    BrexConnection.objects.filter(pk=connection.pk).update(
        last_error="Refresh failed, will retry: Brex token endpoint answered HTTP 503"
    )
    response = changelist(admin_client)
    assert response.status_code == 200
    page = response.content.decode()
    for header in ("Owner", "Brex company", "Environment", "Status", "Granted scopes",
                   "Access token expires", "Refresh token age",
                   "Refresh token days left (estimate)", "Last refreshed at", "Last error"):
        assert f">{header}</a>" in page or f">{header}</span>" in page, header
    row = re.search(r'<tr>\s*<td class="action-checkbox">.*?</tr>', page, re.S).group(0)
    assert "ada" in row
    assert "Acme Rockets, Inc." in row
    assert "Staging" in row
    assert "Active" in row
    assert "users.readonly, companies.readonly" in row
    assert "12 days" in row
    assert "about 77" in row
    assert "Refresh failed, will retry: Brex token endpoint answered HTTP 503" in row
    expires = BrexToken.objects.get(pk=connection.pk).access_token_expires_at
    assert timezone.localtime(expires).strftime("%Y-%m-%d %H:%M") in row


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
    BrexConnection.objects.filter(pk=theirs.pk).update(
        brex_company_name="Globex Corporation", brex_user_email="hank@globex.example"
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
    assert model_admin.status_display(connection) == "Revoked (revoked at Brex)"
    connection.revocation_status = RevocationStatus.PENDING
    assert model_admin.status_display(connection) == "Revoked (pending at Brex)"


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
