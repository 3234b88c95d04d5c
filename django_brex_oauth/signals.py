"""Signals sent when a connection changes, and when Brex sends a webhook.

Every connection signal is sent with ``sender=BrexConnection`` and
``connection=<BrexConnection>`` after the database transaction that made the change has
committed, so receivers can rely on what they read. No signal carries a token.
``client_credentials_rejected`` is about the whole site, so its ``connection`` may be None.
"""

from django.dispatch import Signal

#: A customer connected (or reconnected) a Brex account.
#:
#: kwargs: ``connection``, ``user`` (the site user), ``created`` (False on reconnect),
#: ``team`` (with ``BREX_OAUTH_TEAM_MODEL``, the team it was connected for; None for a
#: personal connection, and always None without a team model). The other connection
#: signals carry ``team`` too, with the same meaning.
connected = Signal()

#: A connection was disconnected by its owner or revoked by staff. Sent once per disconnect,
#: right after the first attempt at Brex; later retries of the revocation send nothing.
#:
#: kwargs: ``connection``, ``actor`` (the user who did it, or None),
#: ``revoked_at_brex`` (True once Brex confirmed the revocation; False while it is queued),
#: ``team`` (the connection's team, as for ``connected``).
disconnected = Signal()

#: A connection's tokens were refreshed.
#:
#: kwargs: ``connection``, ``rotated`` (True when Brex issued a new refresh token),
#: ``old_scopes`` and ``new_scopes`` (the granted scopes before and after, as lists; they
#: differ when the customer narrowed the grant at Brex), ``team`` (as for ``connected``).
token_refreshed = Signal()

#: A refresh failed for good: the connection now needs the customer to reconnect.
#:
#: kwargs: ``connection``, ``error`` (the OAuth error code, e.g. "invalid_grant"; or
#: "undecryptable_token" when no configured key decrypts the stored tokens; or
#: "insufficient_scope" when the grant no longer holds a scope of ``REQUIRED_API_SCOPES``),
#: ``description`` (Brex's description, what went wrong here, or which scopes are missing;
#: never a token), ``team`` (as for ``connected``).
refresh_failed = Signal()

#: A verified Brex webhook was stored. Sent once per ``Webhook-Id``, after the commit, with
#: ``sender=BrexWebhookEvent`` (not ``BrexConnection``): redeliveries of the same webhook
#: send nothing; the admin's "process again" sends it once more.
#:
#: kwargs: ``event`` (the stored :class:`~django_brex_oauth.models.BrexWebhookEvent`:
#: ``webhook_id``, ``event_type``, ``company_id``, ``payload``), ``connections`` (a list of
#: the *active* connections whose Brex company is the payload's ``company_id``; empty for
#: an event with no ``company_id``, such as the referral events), ``teams`` (with
#: ``BREX_OAUTH_TEAM_MODEL``, the teams those connections belong to, each once; empty when
#: they are all personal, and always empty without a team model). An event whose company
#: has no active connection here is recorded and not signalled.
webhook_received = Signal()

#: Brex refused this site's client credentials (``invalid_client`` or
#: ``unauthorized_client``): a configuration error of the site, not of any customer.
#: Refreshing is paused for every connection (they all stay active) until the credentials
#: work again. Sent once when the pause begins, not again for each refused probe.
#:
#: kwargs: ``connection`` (the connection whose refresh found it out, or None),
#: ``error`` (the OAuth error code), ``description`` (Brex's description, never a secret).
client_credentials_rejected = Signal()
