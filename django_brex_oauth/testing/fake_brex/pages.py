"""The fake's HTML pages: Brex's look, the consent page and error pages.

These pages stand for Brex's own, not the partner site's, so they are not translated.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping

from .messages import Request, Response, html_response, unique
from .scopes import OIDC_SCOPES, scope_label

_CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f3f3f5;color:#161616;
  font:15px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif}
main{max-width:440px;margin:56px auto;background:#fff;border-radius:14px;padding:32px 32px 28px;
  box-shadow:0 1px 2px rgba(0,0,0,.06),0 8px 24px rgba(0,0,0,.06)}
@media (max-width:480px){
  main{margin:0;border-radius:0;box-shadow:none;padding:24px 20px;min-height:100vh}
}
.logo{font-weight:800;font-size:24px;letter-spacing:-1px;margin-bottom:20px}
h1{font-size:20px;line-height:1.3;margin:0 0 6px}
h1,p,.who,li span{overflow-wrap:anywhere}
p{margin:0 0 16px;color:#555}
.client-id{font-size:12px;color:#888;margin:0 0 12px}
.client-id code,li code{color:#888;font-size:12px;overflow-wrap:anywhere}
label.field{display:block;font-weight:600;margin:0 0 4px}
input[type=email],input[type=text]{width:100%;padding:10px 12px;border:1px solid #ccc;
  border-radius:8px;font:inherit;margin-bottom:18px}
ul{list-style:none;margin:0 0 20px;padding:0;border:1px solid #eee;border-radius:10px}
li{padding:10px 14px;border-top:1px solid #eee}
li:first-child{border-top:0}
li label{display:flex;gap:10px;align-items:center;cursor:pointer}
li input{flex:none;margin:0}
li label>span{min-width:0}
li code{display:block;line-height:1.4}
.who{font-size:13px;color:#777;margin-bottom:18px}
.actions{display:flex;flex-direction:row-reverse;gap:12px}
button{flex:1;padding:11px 0;border-radius:8px;font:inherit;font-weight:600;cursor:pointer;
  border:1px solid #161616}
#allow,#save{background:#161616;color:#fff}
#deny{background:#fff;color:#161616}
.error{color:#b00020}
.note{font-size:12px;color:#888;margin:-8px 0 20px}
"""

# Carried from the authorize request through the consent form to its submission.
_CARRIED = (
    "client_id",
    "redirect_uri",
    "response_type",
    "state",
    "nonce",
    "code_challenge",
    "code_challenge_method",
    "prompt",
    "login_hint",
)


#: Brex's mark, small: a white "b" on a black rounded square.
FAVICON_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">'
    '<rect width="32" height="32" rx="7" fill="#161616"/>'
    '<text x="16" y="23" text-anchor="middle" fill="#fff" font-size="21" font-weight="800" '
    'font-family="Helvetica,Arial,sans-serif">b</text></svg>'
)
# In every page, so a browser has its icon without asking /favicon.ico.
_FAVICON_LINK = (
    '<link rel="icon" type="image/svg+xml" href="data:image/svg+xml;base64,'
    + base64.b64encode(FAVICON_SVG.encode("utf-8")).decode("ascii")
    + '">'
)


def favicon(request: Request) -> Response:
    """``GET /favicon.ico``, which browsers ask for on their own (an API answer opened in
    a tab, say): the same icon."""
    return Response(
        200,
        FAVICON_SVG.encode("utf-8"),
        {"Content-Type": "image/svg+xml", "Cache-Control": "max-age=86400"},
    )


def page(title: str, content: str) -> str:
    """A whole page in Brex's look around ``content`` (HTML)."""
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title>{_FAVICON_LINK}<style>{_CSS}</style></head>"
        f'<body><main><div class="logo">brex</div>{content}</main></body></html>\n'
    )


def error_page(status: int, error: str, description: str) -> Response:
    content = (
        f"<h1>{status} {html.escape(error)}</h1>"
        '<p class="error" id="error">Your request resulted in an error. '
        f"{html.escape(description)}</p>"
    )
    return html_response(status, page("Brex - Error", content))


def consent_page(
    params: Mapping[str, str],
    *,
    action: str,
    client_name: str,
    client_id: str,
    company_name: str,
    email: str,
    error: str | None = None,
) -> str:
    """The authorize page: sign in (with ``prompt=login``) and consent to ``params["scope"]``.

    ``client_name`` is the app's name, as registered at Brex; its ``client_id`` is shown
    in small print beneath. ``email`` is the user signed in (or suggested); ``action`` is
    where the form posts to.
    """
    esc = html.escape
    scopes = unique(params.get("scope", "").split())
    login = "login" in params.get("prompt", "").split()
    client = esc(client_name)
    parts = []
    if login:
        parts.append("<h1>Sign in to Brex</h1>")
        parts.append(f"<p>to continue to <strong>{client}</strong></p>")
    else:
        parts.append(f"<h1>Authorize {client}</h1>")
    parts.append(f'<p class="client-id">Client ID <code>{esc(client_id)}</code></p>')
    if error:
        parts.append(f'<p class="error" id="error">{esc(error)}</p>')
    parts.append(f'<form id="consent-form" method="post" action="{esc(action)}">')
    parts.append(_hidden_fields(params, scopes))
    if login:
        parts.append(
            '<label class="field" for="email">Work email</label>'
            f'<input type="email" id="email" name="email" value="{esc(email)}" '
            'autocomplete="email" required>'
        )
    else:
        parts.append(f'<div class="who">Signed in as {esc(email)}</div>')
    parts.append(
        f"<p><strong>{client}</strong> wants to access your Brex account "
        f"for <strong>{esc(company_name)}</strong>:</p>"
    )
    items = _scope_items(scopes)
    parts.append(f'<ul id="scopes">{items}</ul>' if items else "<p>No API access.</p>")
    if "offline_access" in scopes:
        parts.append('<p class="note">It will keep this access until you disconnect it.</p>')
    parts.append(
        '<div class="actions">'
        '<button type="submit" id="allow" name="decision" value="allow">Allow</button>'
        '<button type="submit" id="deny" name="decision" value="deny" formnovalidate>'
        "Deny</button>"
        "</div></form>"
    )
    title = "Sign in to Brex" if login else f"Authorize {client_name}"
    return page(title, "".join(parts))


def _hidden_fields(params: Mapping[str, str], scopes: list[str]) -> str:
    esc = html.escape
    hidden = "".join(
        f'<input type="hidden" name="{name}" value="{esc(params[name])}">'
        for name in _CARRIED
        if name in params
    )
    return hidden + f'<input type="hidden" name="requested_scope" value="{esc(" ".join(scopes))}">'


def _scope_items(scopes: list[str]) -> str:
    esc = html.escape
    return "".join(
        f'<li><label><input type="checkbox" name="scope" value="{esc(scope)}" checked>'
        f"<span>{esc(scope_label(scope))}<code>{_breakable(scope)}</code></span></label></li>"
        for scope in scopes
        if scope not in OIDC_SCOPES
    )


def _breakable(scope: str) -> str:
    """A scope, escaped, that may wrap after its dots and slashes on a narrow screen."""
    return "".join(
        html.escape(part) + ("<wbr>" if part in "./" else "")
        for part in re.split(r"([./])", scope)
        if part
    )
