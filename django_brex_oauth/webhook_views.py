"""The webhook receiver: verify, store once, answer fast.

Brex retries a delivery that is not answered 2xx, so the answers are chosen for that: a
stored or duplicate delivery is 200, a delivery that can never be accepted is 4xx (400
malformed, 401 signature, 413 too large), and a moment when the secrets cannot be had is
503 (Brex tries again later). Nothing is read from the body before the signature verified.
"""

from __future__ import annotations

import json
import logging

from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from . import webhooks
from .services import webhook_events

logger = logging.getLogger("django_brex_oauth")


def _read_body(request: HttpRequest) -> bytes:
    """The raw body, refusing anything over :data:`~django_brex_oauth.webhooks.MAX_BODY_BYTES`
    before reading it whole (and before Django's own, larger, limit)."""
    limit = webhooks.MAX_BODY_BYTES
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    if declared > limit:
        raise webhooks.WebhookBodyTooLarge(f"The body is over {limit} bytes.")
    body = request.read(limit + 1)
    if len(body) > limit:
        raise webhooks.WebhookBodyTooLarge(f"The body is over {limit} bytes.")
    return body


def _holds_nul(value: object) -> bool:
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def _payload(body: bytes) -> dict:
    try:
        # NaN and Infinity are Python's extensions, not JSON (PostgreSQL refuses them).
        payload = json.loads(body, parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise webhooks.WebhookPayloadInvalid("The body is not JSON.") from err
    if not isinstance(payload, dict):
        raise webhooks.WebhookPayloadInvalid("The body is not a JSON object.")
    if _holds_nul(payload):
        # PostgreSQL's jsonb cannot store a NUL character.
        raise webhooks.WebhookPayloadInvalid("The body holds a NUL character.")
    if not isinstance(payload.get("event_type"), str) or not payload["event_type"]:
        raise webhooks.WebhookPayloadInvalid("The body has no event_type.")
    return payload


# Stored in its own short transaction and handled after it commits, whatever
# ATOMIC_REQUESTS says.
@transaction.non_atomic_requests
@csrf_exempt
@require_POST
def receive(request: HttpRequest) -> JsonResponse:
    """``brex_oauth:webhook``: receive one signed delivery from Brex (POST only)."""
    try:
        body = _read_body(request)
        delivery = webhooks.verify(request.headers, body)
        payload = _payload(body)
    except webhooks.WebhookError as err:
        logger.warning("Refused a Brex webhook delivery: %s (HTTP %s)", err, err.http_status)
        return JsonResponse({"error": str(err)}, status=err.http_status)
    result = webhook_events.receive(delivery.webhook_id, payload)
    return JsonResponse({"status": result.outcome.value, "webhook_id": delivery.webhook_id})
