"""A fake Brex authorization server and API for tests and local development.

``FakeBrex`` serves, over real loopback HTTP, the parts of Brex that an OAuth partner talks to:

* the OpenID Connect authorization server at ``{base_url}/oauth2/default`` (discovery, JWKS,
  a consent page, the token, revocation, introspection and userinfo endpoints), behaving like the
  Okta-style server Brex runs: single-use authorization codes, optional PKCE (S256), refresh token
  rotation with a grace period and reuse detection, RS256 id_tokens;
* a few API endpoints at ``{base_url}`` (``/v2/users/me``, ``/v2/users``, ``/v2/company``,
  ``/v1/referrals``) with Brex's error shapes.

It does not depend on Django, so it can be used from any test-suite::

    from django_brex_oauth.testing import FakeBrex

    with FakeBrex(redirect_uris=["http://testserver/brex/callback"]) as brex:
        settings.BREX_OAUTH = brex.django_settings()
        location = brex.consent(authorize_url)        # what the browser would be sent back to
        brex.fail_next("/v1/token", status=503)      # the next token request fails
        brex.fail_next("/v1/token", status=429, retry_after=120)   # ...asking to wait 2 min
        brex.rate_limit(1000, per=60, path="/v1/token")   # Brex's limit, enforced
        brex.id_token_fault = "wrong_nonce"           # id_tokens carry a defect from now on
        brex.refresh_id_token_fault = "wrong_sub"     # ... only those a refresh returns
        brex.authorization_response_fault = "wrong_iss"  # the redirect back names another issuer

Run ``python -m django_brex_oauth.testing.fake_brex --port 8765`` to serve one until Ctrl-C.

Every public name is imported from here. Where each part lives: ``tokens`` (the token store:
grants, codes, rotation, the grace period and reuse rules; no HTTP), ``id_tokens`` (signing
keys and id_tokens, defects included), ``server`` and ``faults`` (serving and fault
injection), ``oauth`` (the authorization server's endpoints), ``api`` (the API's),
``pages`` (the HTML pages), ``browser`` (the person at the consent page, for
:meth:`FakeBrex.consent`), ``cli`` (the command line); ``base`` holds the state they share
and ``fake`` puts them together as :class:`FakeBrex`.
"""

from __future__ import annotations

from .api import IDENTITY_FAULTS
from .base import DEFAULT_CLIENT_NAME
from .cli import main
from .fake import FakeBrex
from .faults import DROP, MALFORMED_TOKEN_ANSWERS, HeldAnswers
from .id_tokens import FOREIGN_ISSUER, ID_TOKEN_FAULTS, UNTRUSTED_AUDIENCE
from .messages import ISSUER_PATH
from .oauth import AUTHORIZATION_RESPONSE_FAULTS
from .scopes import DEFAULT_SCOPES, REFERRALS_SCOPE, SUPPORTED_SCOPES

__all__ = [
    "AUTHORIZATION_RESPONSE_FAULTS",
    "DEFAULT_CLIENT_NAME",
    "DEFAULT_SCOPES",
    "DROP",
    "FOREIGN_ISSUER",
    "ID_TOKEN_FAULTS",
    "IDENTITY_FAULTS",
    "ISSUER_PATH",
    "MALFORMED_TOKEN_ANSWERS",
    "REFERRALS_SCOPE",
    "SUPPORTED_SCOPES",
    "UNTRUSTED_AUDIENCE",
    "FakeBrex",
    "HeldAnswers",
    "main",
]
