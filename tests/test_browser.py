"""The whole journey of a partner's customer, in a real browser, on the example site.

Headless Chromium (Debian's ``chromium``) driven by Playwright signs in to the example site,
served for real (runserver, a Celery worker and beat, SQLite) by the demo's machinery,
connects at a fake Brex granting only some scopes, sees live Brex data on the dashboard and a
refresh done in the background, denies on a second try, and disconnects; reconnects, changes
their name at Brex and sees the USER_UPDATED webhook arrive on the dashboard; then connects for
their workspace, which a second member of it sees and a member of another does not. Each step
is saved to test-artifacts/screenshots/NN-step.png; the site's logs to
test-artifacts/browser-site-logs/.

The partner-facing pages (the dashboard, the connections page, the confirmation and error
pages) and the admin's (the list of connections, the health page) are also shown at a
desktop's and a phone's width (:data:`VIEWPORT_WIDTHS`), each saved as
NN-page-<width>px.png: no page may be wider than its viewport.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from django_brex_oauth.testing import FakeBrex
from django_brex_oauth.testing.fake_webhooks import signature_header
from tests.conftest import require_service
from tests.example_site import ARTIFACTS, clean_environment, demo, keep_logs, query

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = ARTIFACTS / "screenshots"

#: A laptop's and a phone's viewport width (CSS pixels): every page checked with
#: :func:`check_layout` must fit both without scrolling sideways.
VIEWPORT_WIDTHS = (1280, 390)
VIEWPORT_HEIGHT = 820

#: Short-lived access tokens and a sweep every second, so that beat and the worker refresh
#: the connection while the test watches the dashboard.
ACCESS_TOKEN_TTL = 10
REFRESH_MARGIN = 6


@pytest.fixture
def playwright() -> Iterator[Any]:
    require_service(
        "Chromium", os.path.exists(CHROMIUM),
        "install Debian's chromium package (apt-get install chromium)",
    )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require_service("Playwright", False, 'install the test extra: pip install -e ".[test]"')
    with sync_playwright() as playwright:
        yield playwright


@pytest.fixture
def page(playwright) -> Iterator[Any]:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    context = browser.new_context(viewport={"width": 1100, "height": 820}, locale="en-US")
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()
    browser.close()


@pytest.fixture
def fake() -> Iterator[FakeBrex]:
    with FakeBrex(access_token_ttl=ACCESS_TOKEN_TTL) as server:
        yield server


@pytest.fixture
def site(tmp_path: Path, fake: FakeBrex) -> Iterator[demo.Stack]:
    data_dir = tmp_path / "site"
    port = demo.free_port()
    config = demo.StackConfig(
        python=sys.executable,
        port=port,
        data_dir=data_dir,
        env_file="",
        fake_port=None,
        base_env=clean_environment(),
        echo=False,
        ready_timeout=45,
        extra_env={
            "BREX_CLIENT_ID": fake.client_id,
            "BREX_CLIENT_SECRET": fake.client_secret,
            "BREX_ENVIRONMENT": "staging",
            "BREX_ISSUER": fake.issuer,
            "BREX_API_BASE_URL": fake.api_base_url,
            "BREX_REFRESH_MARGIN": str(REFRESH_MARGIN),
            "BREX_CLIENT_REFRESH_MARGIN": "2",
            "BREX_SWEEP_INTERVAL": "1",
            "DASHBOARD_POLL_SECONDS": "1",
            "BREX_WEBHOOK_URL": f"http://127.0.0.1:{port}/brex/webhook/",
            "BREX_WEBHOOK_EVENT_TYPES": ",".join(demo.WEBHOOK_EVENT_TYPES),
        },
    )
    stack = demo.Stack(config)
    try:
        yield stack.start()
    finally:
        stack.stop()
        keep_logs(data_dir, "browser-site-logs")


class Screenshots:
    """Saves numbered full-page screenshots; checks no token is on the page first."""

    def __init__(self, page: Any, fake: FakeBrex) -> None:
        self.page = page
        self.fake = fake
        self.count = 0
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for old in SCREENSHOTS.glob("*.png"):
            old.unlink()

    def secrets_seen_by_brex(self, *, codes: bool = False) -> set[str]:
        """Every access and refresh token (and authorization code) the fake has been shown."""
        names = ("refresh_token", "token", "code") if codes else ("refresh_token", "token")
        seen = set()
        for request in self.fake.requests:
            scheme, _, token = (request["headers"].get("Authorization") or "").partition(" ")
            if scheme.lower() == "bearer" and token:
                seen.add(token.strip())
            for name in names:
                value = request["form"].get(name)
                if isinstance(value, str) and value:
                    seen.add(value)
        return seen

    def __call__(self, step: str) -> Path:
        html = self.page.content()
        leaked = [t for t in self.secrets_seen_by_brex() if t in html or t in self.page.url]
        assert not leaked, f"a Brex token is on the page at step {step!r}"
        self.count += 1
        path = SCREENSHOTS / f"{self.count:02d}-{step}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


def page_widths(page: Any) -> tuple[int, int]:
    """How wide the page's content is, and how wide the viewport it is shown in."""
    return tuple(page.evaluate(
        "() => [document.documentElement.scrollWidth, window.innerWidth]"
    ))


def check_layout(page: Any, shot: Screenshots, name: str) -> None:
    """Show the current page at each of :data:`VIEWPORT_WIDTHS`, take a screenshot of each
    and fail if the page is wider than the viewport at any of them, or has no icon."""
    before = page.viewport_size
    too_wide = []
    for width in VIEWPORT_WIDTHS:
        page.set_viewport_size({"width": width, "height": VIEWPORT_HEIGHT})
        # Let the browser lay the page out again at the new width before measuring.
        page.evaluate("() => new Promise(r => requestAnimationFrame(() => r()))")
        content, viewport = page_widths(page)
        assert viewport == width
        shot(f"{name}-{width}px")
        if content > viewport:
            too_wide.append(f"{content} px wide in a {viewport} px viewport")
    page.set_viewport_size(before)
    assert not too_wide, f"the {name} page is wider than its viewport: {too_wide}"
    # And it has the site's icon.
    icon = page.evaluate("() => document.querySelector('link[rel~=icon]')?.href")
    assert icon, f"the {name} page has no icon"
    answer = page.request.get(icon)
    assert answer.ok and answer.headers["content-type"].startswith("image/"), icon


def test_customer_connects_sees_live_data_and_refresh_denies_then_disconnects(page, fake, site):
    from playwright.sync_api import expect

    shot = Screenshots(page, fake)
    data_dir = site.config.data_dir

    # Sign in.
    page.goto(site.url)
    expect(page).to_have_url(re.compile(r"/login/\?next=/$"))
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    shot("sign-in")
    check_layout(page, shot, "sign-in")
    page.get_by_label("Username").fill(demo.DEMO_USERNAME)
    page.get_by_label("Password").fill(demo.DEMO_PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Your Brex connections")).to_be_visible()
    expect(page.get_by_role("heading", name="No Brex account connected yet")).to_be_visible()
    shot("dashboard-before-connecting")

    # Connect, granting users.readonly but not companies.readonly.
    page.get_by_role("link", name="Connect Brex", exact=True).click()
    expect(page).to_have_url(re.compile("^" + re.escape(fake.issuer + "/v1/authorize?")))
    expect(page.locator("#consent-form")).to_be_visible()
    page.locator("input[name=scope][value='companies.readonly']").uncheck()
    expect(page.locator("input[name=scope][value='users.readonly']")).to_be_checked()
    shot("consent-granting-only-some-scopes")
    page.locator("#allow").click()

    # The dashboard shows the connection and what Brex's API says, read live.
    expect(page).to_have_url(site.url)
    expect(page.get_by_role("status")).to_contain_text("is connected")
    card = page.locator("section.connection")
    expect(card).to_have_count(1)
    ada = fake.default_user
    expect(card.locator(".brex-user")).to_contain_text(f"{ada['first_name']} {ada['last_name']}")
    expect(card.locator(".brex-user")).to_contain_text(ada["email"])
    expect(card.locator(".brex-user")).to_contain_text(ada["id"])
    expect(card).to_contain_text("Not shared: you did not grant companies.readonly")
    expect(card.locator(".scopes li")).to_have_text(["openid", "offline_access", "users.readonly"])
    expect(card.locator(".badge")).to_have_text("Active")
    me_calls = [r for r in fake.requests if r["path"] == "/v2/users/me"]
    assert me_calls and all(r["status"] == 200 for r in me_calls)
    assert not [r for r in fake.requests if r["path"] == "/v2/company"]
    assert query(data_dir, "SELECT status, granted_scopes FROM brex_oauth_brexconnection") == [
        ("active", "openid offline_access users.readonly")
    ]
    shot("dashboard-connected-with-live-data")
    check_layout(page, shot, "dashboard")

    # Beat's sweep and the worker refresh the token; the open dashboard shows it.
    refreshes = card.locator("[data-field=refresh-count]")
    before = refreshes.inner_text()
    expect(refreshes).not_to_have_text(before, timeout=25_000)
    assert int(refreshes.inner_text()) > int(before)
    expect(card.locator("[data-field=last-refreshed] time")).to_be_visible()
    site.processes["worker"].wait_for(r"Refreshed Brex connection \d+", 5)
    assert fake.stats["token_refresh_token"] >= 1
    shot("token-refreshed-in-the-background")

    # A second try, denied at Brex: an error page, and the connection is untouched.
    page.get_by_role("link", name="Connect another Brex account").click()
    expect(page.locator("#consent-form")).to_be_visible()
    page.locator("#deny").click()
    error = page.locator("#brex-oauth-error")
    expect(error.get_by_role("heading")).to_have_text("Brex access was not granted")
    expect(error).to_contain_text("nothing was connected")
    shot("denied-at-brex")
    check_layout(page, shot, "error")
    page.get_by_role("link", name="Back to the site").click()
    expect(card).to_have_count(1)
    expect(card.locator(".badge")).to_have_text("Active")

    # Disconnect, confirming on the app's page; Brex revokes the refresh token.
    revocations_before = fake.stats["revocations"]
    card.get_by_role("link", name=re.compile(r"^Disconnect")).click()
    expect(page.get_by_role("heading", name=re.compile(r"^Disconnect .+\?$"))).to_be_visible()
    shot("disconnect-confirmation")
    check_layout(page, shot, "disconnect-confirmation")
    page.get_by_role("button", name="Disconnect").click()
    expect(page).to_have_url(site.url)
    expect(page.get_by_role("status")).to_contain_text("disconnected")
    expect(card.locator(".badge")).to_have_text("Revoked")
    expect(card.get_by_role("link", name=re.compile(r"^Disconnect"))).to_have_count(0)
    expect(card.get_by_role("link", name=re.compile(r"^Reconnect"))).to_be_visible()
    assert fake.stats["revocations"] == revocations_before + 1
    assert query(
        data_dir, "SELECT status, revocation_status FROM brex_oauth_brexconnection"
    ) == [("revoked", "done")]
    shot("disconnected")
    # The webhook subscription made on connect went at Brex before the revocation.
    assert [s["status"] for s in fake.webhooks.subscriptions.values()] == ["DELETED"]

    # The app's connections page offers to reconnect the revoked connection too.
    page.get_by_role("navigation").get_by_role("link", name="Connections").click()
    ((revoked_pk,),) = query(data_dir, "SELECT id FROM brex_oauth_brexconnection")
    revoked_row = page.locator(f"#brex-connection-{revoked_pk}")
    expect(revoked_row).to_contain_text("Revoked")
    expect(revoked_row.get_by_role("link", name=re.compile(r"^Disconnect"))).to_have_count(0)
    reconnect = revoked_row.get_by_role("link", name=re.compile(r"^Reconnect"))
    expect(reconnect).to_have_attribute("href", re.compile(r"^/brex/connect/\?force_login=1&"))
    expect(page.get_by_role("link", name="Connect another Brex account")).to_be_visible()
    check_layout(page, shot, "connections-with-a-revoked-row")
    page.goto(site.url)

    # Reconnect sharing everything; at Brex the customer changes their name, Brex sends
    # USER_UPDATED to the site's webhook, and the open dashboard shows it arrive.
    card.get_by_role("link", name=re.compile(r"^Reconnect")).click()
    expect(page.locator("#consent-form")).to_be_visible()
    page.locator("#allow").click()
    expect(page).to_have_url(site.url)
    expect(card.locator(".badge")).to_have_text("Active")
    expect(card.locator(".brex-company")).to_contain_text(fake.company["legal_name"])
    live = [s for s in fake.webhooks.subscriptions.values() if s["status"] == "ACTIVE"]
    assert [s["event_types"] for s in live] == [list(demo.WEBHOOK_EVENT_TYPES)]
    events = page.locator("#brex-events")
    expect(events).to_contain_text("No events yet.")
    dashboard = page
    brex_page = page.context.new_page()
    brex_page.goto(fake.base_url + "/account")
    brex_page.get_by_label("First name").fill("Augusta")
    brex_page.get_by_role("button", name="Save").click()
    expect(brex_page.locator("#saved")).to_contain_text("USER_UPDATED to 1 subscription")
    shot.page = brex_page
    shot("name-changed-at-brex")
    brex_page.close()
    shot.page = dashboard
    arrived = events.locator("li[data-event]")
    expect(arrived).to_have_count(1, timeout=15_000)
    expect(arrived.locator(".event-type")).to_have_text("USER_UPDATED")
    expect(arrived).to_contain_text("changed: first_name")
    shot("user-updated-event-on-the-dashboard")
    (delivery,) = fake.webhooks.deliveries
    assert delivery.attempts == [200]
    assert query(data_dir, "SELECT webhook_id, event_type, status FROM "
                 "brex_oauth_brexwebhookevent") == [(delivery.webhook_id, "USER_UPDATED",
                                                     "processed")]
    page.reload()
    expect(card.locator(".brex-user")).to_contain_text(f"Augusta {ada['last_name']}")

    # No token or authorization code reached the site's, the worker's or beat's output.
    output = "\n".join(line for process in site.processes.values() for line in process.lines)
    secrets = shot.secrets_seen_by_brex(codes=True)
    assert len(secrets) >= 4  # a code, two access tokens, a refresh token at least
    assert not [secret for secret in secrets if secret in output]
    # Nor a webhook signing secret or signature, or the event's payload.
    signatures = [
        value.split(",", 1)[1]
        for delivery in fake.webhooks.deliveries for timestamp in delivery.timestamps
        for value in signature_header(fake.webhooks.signing_secrets, delivery.webhook_id,
                                      timestamp, delivery.body).split()
    ]
    assert signatures
    assert not [s for s in fake.webhooks.signing_secrets + signatures if s in output]
    assert "updated_attributes" not in output
    assert "/brex/callback/?code=[redacted]&" in output

    # Staff see the connection in the admin, with what happened to it.
    page.set_viewport_size({"width": 1440, "height": 820})
    page.goto(site.url + "admin/brex_oauth/brexconnection/")
    page.locator("#toggle-nav-sidebar").click()
    expect(page.locator("#result_list")).to_contain_text(ada["email"])
    shot("admin-connections")
    page.locator("#result_list").get_by_role("link", name=ada["email"]).click()
    events = page.locator(".inline-group")
    for kind in ("Connected", "Tokens refreshed", "Disconnected", "Revoked at Brex"):
        expect(events.get_by_text(kind, exact=True).first).to_be_visible()
    shot("admin-connection-event-log")

    # A workspace's connection belongs to its members: the demo user connects one for their
    # workspace; a second member of it sees it, a member of another workspace does not.
    workspace = demo.DEMO_WORKSPACE
    (member_name, member_workspace), (outsider_name, outsider_workspace) = demo.DEMO_PEOPLE
    assert member_workspace == workspace and outsider_workspace != workspace
    page.set_viewport_size({"width": 1100, "height": 820})
    page.goto(site.url)
    page.get_by_role("link", name=f"Connect Brex for {workspace}").click()
    expect(page.locator("#consent-form")).to_be_visible()
    page.locator("#allow").click()
    expect(page).to_have_url(site.url)
    shared = page.locator("section.connection[data-workspace]")
    expect(shared).to_have_count(1)
    expect(page.locator("section.connection")).to_have_count(2)  # and the personal one
    expect(shared.locator(".workspace")).to_contain_text(
        f"Shared with workspace {workspace}, connected by {demo.DEMO_USERNAME}"
    )
    expect(shared.locator(".badge")).to_have_text("Active")
    shot("connected-for-the-workspace")
    ((team_pk,),) = query(data_dir, "SELECT team_id FROM brex_oauth_brexconnection WHERE "
                          "team_id IS NOT NULL AND status = 'active'")

    def signed_in(username: str) -> Any:
        context = page.context.browser.new_context(
            viewport={"width": 1100, "height": 820}, locale="en-US"
        )
        person = context.new_page()
        person.set_default_timeout(15_000)
        person.goto(site.url)
        person.get_by_label("Username").fill(username)
        person.get_by_label("Password").fill(username)
        person.get_by_role("button", name="Sign in").click()
        expect(person.get_by_role("heading", name="Your Brex connections")).to_be_visible()
        return person

    member = signed_in(member_name)
    expect(member.locator("section.connection")).to_have_count(1)  # not the personal one
    seen = member.locator(f"section.connection[data-workspace='{team_pk}']")
    expect(seen.locator(".badge")).to_have_text("Active")
    expect(seen.locator(".workspace")).to_contain_text(f"Shared with workspace {workspace}")
    expect(seen.locator(".brex-user")).to_contain_text(ada["email"])  # read live, as a member
    shot.page = member
    shot("a-second-member-sees-the-workspaces-connection")

    outsider = signed_in(outsider_name)
    expect(outsider.get_by_role("heading", name="No Brex account connected yet")).to_be_visible()
    expect(outsider.locator("section.connection")).to_have_count(0)
    expect(outsider.locator("#workspaces")).to_contain_text(outsider_workspace)
    expect(outsider.locator("#workspaces")).not_to_contain_text(workspace)
    shot.page = outsider
    shot("another-workspace-does-not-see-it")
    # Nor may they connect for it, or disconnect its connection, by forging the request.
    forged = outsider.request.get(f"{site.url}brex/connect/?team={team_pk}", max_redirects=0)
    assert forged.status == 403
    (connection_pk,) = query(data_dir, "SELECT id FROM brex_oauth_brexconnection WHERE "
                             "team_id = ?", team_pk)[0]
    assert outsider.request.get(
        f"{site.url}brex/disconnect/{connection_pk}/confirm/", max_redirects=0
    ).status in (403, 404)
    assert query(data_dir, "SELECT status FROM brex_oauth_brexconnection WHERE id = ?",
                 connection_pk) == [("active",)]
    shot.page = page

    # A workspace's revoked connection is reconnected for the workspace, from the app's
    # connections page.
    page.goto(site.url + "brex/connections/")
    team_row = page.locator(f"#brex-connection-{connection_pk}")
    team_row.get_by_role("link", name=re.compile(r"^Disconnect")).click()
    page.get_by_role("button", name="Disconnect").click()
    expect(page).to_have_url(site.url + "brex/connections/")
    expect(team_row).to_contain_text("Revoked")
    expect(team_row.get_by_role("link", name=re.compile(r"^Reconnect"))).to_have_attribute(
        "href", re.compile(rf"^/brex/connect/\?team={team_pk}&force_login=1&")
    )
    check_layout(page, shot, "connections")

    # Every page at a laptop's and a phone's width: the dashboard, the admin's list of
    # connections and its health page (linked from the app's admin index).
    page.goto(site.url)
    expect(page.locator("section.connection")).to_have_count(2)
    check_layout(page, shot, "dashboard-with-a-workspace")
    page.goto(site.url + "admin/brex_oauth/brexconnection/")
    expect(page.locator("#result_list")).to_contain_text(ada["email"])
    check_layout(page, shot, "admin-connections")
    page.goto(site.url + "admin/brex_oauth/")
    page.get_by_role("link", name="Health of the Brex connections").click()
    expect(page).to_have_url(site.url + "admin/brex_oauth/brexconnection/health/")
    expect(page.locator("svg").first).to_be_visible()
    check_layout(page, shot, "admin-health")


# ------------------------------------------------------------------------- the fake's own pages

#: Long words a phone has to fit: an email and the longest scopes.
LONG_EMAIL = "katherine.coleman.goble.johnson@flight-research.example.com"
MANY_SCOPES = (
    "openid offline_access users.readonly companies.readonly expenses.card.readonly "
    "transactions.card.readonly accounting.record.write incoming_transfers.readonly"
)


@pytest.mark.parametrize("width", [1280, 390])
def test_fake_consent_page_fits_the_screen(playwright, width: int) -> None:
    """The fake Brex's consent and sign-in pages at a laptop's and a phone's width: nothing
    wider than the viewport, the fine print clear of the buttons, no failed request (the
    icon included)."""
    from urllib.parse import urlencode

    from playwright.sync_api import expect

    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    context = browser.new_context(viewport={"width": width, "height": 800}, locale="en-US")
    page = context.new_page()
    page.set_default_timeout(15_000)
    failures: list[str] = []
    page.on("response", lambda r: r.status >= 400 and failures.append(f"{r.status} {r.url}"))
    page.on("console", lambda m: m.type == "error" and failures.append(m.text))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        with FakeBrex(users=[{"email": LONG_EMAIL}]) as fake:
            for prompt in ("consent", "login"):
                query = {
                    "client_id": fake.client_id,
                    "redirect_uri": "http://127.0.0.1:9/brex/callback/",
                    "response_type": "code",
                    "scope": MANY_SCOPES,
                    "state": "state-0123456789",
                    **({"prompt": "login"} if prompt == "login" else {}),
                }
                page.goto(f"{fake.issuer}/v1/authorize?{urlencode(query)}")
                expect(page.locator("#consent-form")).to_be_visible()
                expect(page.get_by_role("heading")).to_contain_text(
                    "Ledgerline" if prompt == "consent" else "Sign in to Brex"
                )
                page.screenshot(
                    path=str(SCREENSHOTS / f"fake-brex-{prompt}-{width}.png"), full_page=True
                )
                scroll_width, inner_width = page.evaluate(
                    "[document.documentElement.scrollWidth, innerWidth]"
                )
                assert scroll_width <= inner_width, f"{prompt} page is {scroll_width} px wide"
                note = page.locator(".note").bounding_box()
                buttons = page.locator(".actions").bounding_box()
                assert note is not None and buttons is not None
                assert note["y"] + note["height"] + 8 <= buttons["y"], (note, buttons)
        assert failures == []
    finally:
        context.close()
        browser.close()
