"""Verifying Brex webhooks: the Standard Webhooks signature and Brex's signing secrets.

Brex signs each delivery with three headers: ``Webhook-Id``, ``Webhook-Timestamp``
(integer Unix seconds) and ``Webhook-Signature``, one or more space-separated
``v1,<base64>`` entries, each an HMAC-SHA256 over ``"{id}.{timestamp}.{raw body}"`` keyed
with a base64-decoded secret from ``GET /v1/webhooks/secrets``. During a rotation that
endpoint lists two secrets and a delivery carries two signatures; any one matching any
current secret is enough.

The secrets are cached in the Django cache (``CACHE_ALIAS``). When no signature matches,
they are fetched again, at most once a minute for every process together (the limit is a
cache key), so a rotation is picked up on the first delivery signed with the new secret
and a stream of forged deliveries cannot make this site hammer Brex. How the secrets are
fetched is the ``WEBHOOK_SECRETS_FETCHER`` setting; the default asks Brex with the access
token of an active connection.

No secret, signature or payload is ever logged or put in an exception message, and every
function holding a secret is marked ``sensitive_variables`` so that Django's error reports
show none.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from django.core.cache import caches
from django.utils.module_loading import import_string
from django.utils.translation import gettext_lazy as _
from django.views.decorators.debug import sensitive_variables

from .client import BrexClient
from .conf import brex_settings
from .exceptions import BrexOAuthConfigurationError, BrexOAuthError
from .models import BrexConnection, ConnectionStatus

logger = logging.getLogger("django_brex_oauth")

#: The largest body the receiver reads; a larger one is refused with 413.
MAX_BODY_BYTES = 1024 * 1024

#: Seconds between two fetches of the secrets forced by a signature that did not verify.
REFETCH_INTERVAL = 60

#: The three headers, as Brex spells them.
ID_HEADER = "Webhook-Id"
TIMESTAMP_HEADER = "Webhook-Timestamp"
SIGNATURE_HEADER = "Webhook-Signature"

_SECRETS_KEY = "brex_oauth:webhook_secrets:{}"
_REFETCH_KEY = "brex_oauth:webhook_secrets_refetch:{}"
#: Active connections the default fetcher tries before giving up.
_FETCH_CANDIDATES = 3


class WebhookError(BrexOAuthError):
    """A webhook delivery was refused. ``http_status`` is the receiver's answer; the
    message says why without quoting a header value, a secret or the body."""

    title = _("Webhook refused")
    http_status = 400


class WebhookHeadersMissing(WebhookError):
    """A signature header is missing or malformed."""


class WebhookTimestampOutOfRange(WebhookError):
    """``Webhook-Timestamp`` is further from now than ``WEBHOOK_TOLERANCE``."""


class WebhookSignatureInvalid(WebhookError):
    """No signature matches any current secret."""

    http_status = 401


class WebhookBodyTooLarge(WebhookError):
    """The body is over :data:`MAX_BODY_BYTES`."""

    http_status = 413


class WebhookPayloadInvalid(WebhookError):
    """The body is not a JSON object with an ``event_type``."""


class WebhookSecretsUnavailable(WebhookError):
    """The signing secrets could not be had (no active connection, Brex unreachable):
    Brex should deliver again later."""

    http_status = 503


@dataclass(frozen=True)
class SignedDelivery:
    """The verified identity of a delivery."""

    webhook_id: str
    timestamp: int


# Signatures -------------------------------------------------------------------------------


@sensitive_variables()
def decode_secret(secret: str) -> bytes:
    """The HMAC key of a secret: standard base64, an optional ``whsec_`` prefix allowed.
    Raises ``ValueError`` (without the value) when it is not base64."""
    text = secret.strip()
    if text.startswith("whsec_"):
        text = text[len("whsec_"):]
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError("a webhook secret is not valid base64") from err
    if not key:
        raise ValueError("a webhook secret is empty")
    return key


@sensitive_variables()
def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``v1,<base64>`` signature of ``body`` with ``secret`` (Standard Webhooks)."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(decode_secret(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def read_headers(headers: Mapping[str, str], *, now: float | None = None,
                 tolerance: float | None = None) -> tuple[SignedDelivery, list[str]]:
    """Check the three headers are there and the timestamp is within ``tolerance`` seconds
    of ``now`` (either way); return the delivery and its ``v1`` signatures."""
    webhook_id = (headers.get(ID_HEADER) or "").strip()
    raw_timestamp = (headers.get(TIMESTAMP_HEADER) or "").strip()
    raw_signatures = (headers.get(SIGNATURE_HEADER) or "").strip()
    missing = [name for name, value in ((ID_HEADER, webhook_id),
                                        (TIMESTAMP_HEADER, raw_timestamp),
                                        (SIGNATURE_HEADER, raw_signatures)) if not value]
    if missing:
        raise WebhookHeadersMissing("Missing webhook header(s): " + ", ".join(missing) + ".")
    if len(webhook_id) > 255:
        raise WebhookHeadersMissing(f"{ID_HEADER} is longer than 255 characters.")
    if not raw_timestamp.isascii() or not raw_timestamp.isdigit():
        raise WebhookHeadersMissing(f"{TIMESTAMP_HEADER} is not integer Unix seconds.")
    timestamp = int(raw_timestamp)
    now = time.time() if now is None else now
    tolerance = brex_settings.WEBHOOK_TOLERANCE if tolerance is None else tolerance
    if abs(now - timestamp) > tolerance:
        raise WebhookTimestampOutOfRange(
            f"{TIMESTAMP_HEADER} is {int(now - timestamp)} s from now; at most "
            f"{int(tolerance)} s is accepted."
        )
    signatures = []
    for entry in raw_signatures.split():
        version, _, value = entry.partition(",")
        if version == "v1" and value:
            signatures.append(value)
    if not signatures:
        raise WebhookHeadersMissing(f"{SIGNATURE_HEADER} holds no v1 signature.")
    return SignedDelivery(webhook_id, timestamp), signatures


@sensitive_variables()
def signature_matches(
    delivery: SignedDelivery, signatures: Sequence[str], body: bytes, secrets: Sequence[str]
) -> bool:
    """True when any of ``signatures`` is the HMAC of ``body`` under any of ``secrets``,
    compared in constant time. A secret that is not base64 is skipped."""
    signed = f"{delivery.webhook_id}.{delivery.timestamp}.".encode() + body
    expected = []
    for secret in secrets:
        try:
            key = decode_secret(secret)
        except ValueError:
            continue
        digest = hmac.new(key, signed, hashlib.sha256).digest()
        expected.append(base64.b64encode(digest))
    matched = False
    for candidate in signatures:
        given = candidate.encode("ascii", "replace")
        for wanted in expected:
            # No early exit: every pair is compared, so timing says nothing about which.
            matched |= hmac.compare_digest(given, wanted)
    return matched


# Secrets ----------------------------------------------------------------------------------


@sensitive_variables()
def fetch_secrets_from_brex() -> list[str]:
    """The default ``WEBHOOK_SECRETS_FETCHER``: ``GET {API_BASE_URL}/v1/webhooks/secrets``
    with the access token of an active connection (refreshed first when it must be).

    Tries up to three active connections of the configured environment, newest first.
    Raises :class:`WebhookSecretsUnavailable` when none can fetch them.
    """
    candidates = BrexConnection.objects.filter(
        status=ConnectionStatus.ACTIVE, environment=brex_settings.environment
    ).order_by("-connected_at", "-pk")[:_FETCH_CANDIDATES]
    problems = []
    for connection in candidates:
        try:
            answer = BrexClient(connection).get("/v1/webhooks/secrets")
        except BrexOAuthError as err:
            problems.append(f"connection {connection.pk}: {type(err).__name__}")
            continue
        return parse_secrets(answer)
    raise WebhookSecretsUnavailable(
        "Could not fetch the webhook secrets from Brex ("
        + ("; ".join(problems) or "no active connection") + ")."
    )


@sensitive_variables()
def parse_secrets(answer: object) -> list[str]:
    """The secrets of a ``/v1/webhooks/secrets`` answer: a JSON array of
    ``{"secret", "status"}``; every one listed counts (``PENDING_REVOKE`` too)."""
    if isinstance(answer, Mapping) and isinstance(answer.get("items"), list):
        answer = answer["items"]
    if not isinstance(answer, list):
        raise WebhookSecretsUnavailable("Brex's webhook secrets answer is not a list.")
    secrets = [
        item["secret"] for item in answer
        if isinstance(item, Mapping) and isinstance(item.get("secret"), str) and item["secret"]
    ]
    if not secrets:
        raise WebhookSecretsUnavailable("Brex listed no webhook secret.")
    return secrets


def _fetcher() -> Callable[[], Sequence[str]]:
    path = brex_settings.WEBHOOK_SECRETS_FETCHER
    if callable(path):
        return path
    try:
        return import_string(str(path))
    except ImportError as err:
        raise BrexOAuthConfigurationError(
            f"BREX_OAUTH['WEBHOOK_SECRETS_FETCHER'] = {path!r} cannot be imported."
        ) from err


def _cache():
    return caches[brex_settings.CACHE_ALIAS]


@sensitive_variables()
def _fetch_and_cache() -> list[str]:
    secrets = [s for s in _fetcher()() if isinstance(s, str) and s]
    if not secrets:
        raise WebhookSecretsUnavailable("The webhook secrets fetcher returned no secret.")
    _cache().set(
        _SECRETS_KEY.format(brex_settings.environment), secrets,
        brex_settings.WEBHOOK_SECRETS_CACHE_TIMEOUT,
    )
    return secrets


@sensitive_variables()
def current_secrets() -> list[str]:
    """The cached signing secrets, fetched when the cache has none."""
    cached = _cache().get(_SECRETS_KEY.format(brex_settings.environment))
    if cached:
        return list(cached)
    return _fetch_and_cache()


@sensitive_variables()
def refetch_secrets() -> list[str] | None:
    """Fetch the secrets again unless some process did in the last minute (then None)."""
    # cache.add is atomic: of all processes, one wins the minute.
    if not _cache().add(_REFETCH_KEY.format(brex_settings.environment), 1, REFETCH_INTERVAL):
        return None
    logger.info("Fetching the Brex webhook secrets again: a signature did not verify.")
    return _fetch_and_cache()


def forget_secrets() -> None:
    """Drop the cached secrets and the re-fetch limit (tests, or after changing Brex)."""
    environment = brex_settings.environment
    _cache().delete_many([_SECRETS_KEY.format(environment), _REFETCH_KEY.format(environment)])


@sensitive_variables()
def verify(headers: Mapping[str, str], body: bytes, *, now: float | None = None
           ) -> SignedDelivery:
    """Verify a delivery: headers, timestamp, then a signature under a current secret
    (fetching the secrets again, within the limit, when none matches). Returns the
    delivery or raises a :class:`WebhookError`."""
    delivery, signatures = read_headers(headers, now=now)
    if signature_matches(delivery, signatures, body, current_secrets()):
        return delivery
    fresh = refetch_secrets()
    if fresh is not None and signature_matches(delivery, signatures, body, fresh):
        return delivery
    raise WebhookSignatureInvalid("No webhook signature matches a current Brex secret.")
