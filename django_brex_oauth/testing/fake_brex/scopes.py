"""The scopes the fake knows, and the words its consent page uses for them."""

from __future__ import annotations

REFERRALS_SCOPE = "https://onboarding.brexapis.com/referrals"
"""Scope of the onboarding (referrals) API; only granted to client-credentials tokens."""

DEFAULT_SCOPES: tuple[str, ...] = (
    "openid",
    "offline_access",
    "users.readonly",
    "companies.readonly",
)
"""Scopes requested by default (see :meth:`FakeBrex.django_settings`)."""

_SCOPES_WITH_READONLY = (
    "users",
    "departments",
    "locations",
    "cards",
    "legal_entities",
    "expenses.card",
    "budgets",
    "vendors",
    "transfers",
    "incoming_transfers",
    "travel.trips",
)
_OTHER_SCOPES = (
    "cards.pan",
    "companies.readonly",
    "transactions.card.readonly",
    "transactions.cash.readonly",
    "accounts.card.readonly",
    "accounts.cash.readonly",
    "statements.card.readonly",
    "statements.cash.readonly",
    "linked_accounts.readonly",
    "fields.read",
    "fields.write",
    "accounting.record.read",
    "accounting.record.write",
)
SUPPORTED_SCOPES: tuple[str, ...] = (
    "openid",
    "offline_access",
    *(s for base in _SCOPES_WITH_READONLY for s in (base, f"{base}.readonly")),
    *_OTHER_SCOPES,
)
"""Scopes a user can be asked for at the authorize endpoint."""

OIDC_SCOPES = ("openid", "offline_access")
"""Granted with every consent; the consent page does not list them."""

_SCOPE_NOUNS = {
    "cards.pan": "card numbers",
    "companies": "company details",
    "fields": "custom fields",
    "accounting.record": "accounting records",
    "travel.trips": "trips",
    "expenses.card": "card expenses",
}


def scope_label(scope: str) -> str:
    """What the consent page says a scope allows: ``View users``, ``Edit custom fields``..."""
    if scope == REFERRALS_SCOPE:
        return "Refer businesses to Brex"
    words = scope.split(".")
    readonly = words[-1] in ("readonly", "read")
    write = words[-1] == "write"
    if readonly or write:
        words = words[:-1]
    base = ".".join(words)
    if base in _SCOPE_NOUNS:
        noun = _SCOPE_NOUNS[base]
    elif len(words) == 2 and words[1] in ("card", "cash"):
        noun = f"{words[1]} {words[0]}"
    else:
        noun = " ".join(words)
    noun = noun.replace("_", " ")
    if readonly:
        return f"View {noun}"
    if write:
        return f"Edit {noun}"
    return f"View and manage {noun}"
