"""Relying-party conformance: the app against a fake Brex that misbehaves.

Each test drives the app over real HTTP against :class:`~django_brex_oauth.testing.FakeBrex`
made to break one rule of OpenID Connect Core 3.1.3.7 / 12.2, RFC 9207 or the app's own
security rules, and asserts the refusal: a page a person understands, nothing stored, and
whatever Brex issued revoked. ``docs/security.rst`` maps each threat to these tests.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------
# Authorization response and id_token: RFC 9207 mix-up defence, OIDC Core 3.1.3.7, 12.2
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# Redirect URI, response headers and secrets in error reports
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# Stored tokens, identity answers and deleted owners
# ---------------------------------------------------------------------------------------
