"""Building connections in tests: tokens minted by a FakeBrex, stored as connect would."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.utils import timezone

from django_brex_oauth.models import BrexConnection, BrexToken, ConnectionEvent, ConnectionStatus
from django_brex_oauth.testing import FakeBrex
from django_brex_oauth.testing.factories import make_connection


def strict_rotation_fake_brex():
    """A fake Brex that rotates refresh tokens and allows no reuse at all (no grace period).

    A module uses it in place of the plugin's server with
    ``fake_brex = pytest.fixture(strict_rotation_fake_brex, name="fake_brex")``.
    """
    with FakeBrex(rotate_refresh_tokens=True, refresh_grace_period=0.0) as server:
        yield server


def create_user(username: str = "ada"):
    """A site user (created once per username)."""
    user, _ = get_user_model().objects.get_or_create(
        username=username, defaults={"email": f"{username}@example.com"}
    )
    return user


def create_connection(
    fake,
    owner=None,
    *,
    expires_in: float = 3600,
    status: str = ConnectionStatus.ACTIVE,
    **token_fields: Any,
) -> BrexConnection:
    """A connection whose tokens are real at ``fake``, from the public ``make_connection``,
    with the stored access token believed to expire in ``expires_in`` seconds (negative:
    expired already), so that a test chooses whether it is due without waiting.

    ``status`` is set afterwards, leaving the tokens as they were (unlike ``make_connection``,
    which wipes them as the services do); ``token_fields`` overwrite columns of the token
    row. Each connection gets an owner of its own unless ``owner`` is given.
    """
    owner = owner or create_user(f"owner-{uuid.uuid4().hex[:12]}")
    connection = make_connection(owner, fake=fake)
    fields = {
        "access_token_expires_at": timezone.now() + timedelta(seconds=expires_in),
        "refresh_token_used_at": timezone.now() - timedelta(hours=1),
        **token_fields,
    }
    BrexToken.objects.filter(pk=connection.pk).update(**fields)
    if status != connection.status:
        BrexConnection.objects.filter(pk=connection.pk).update(status=status)
    connection.refresh_from_db()
    return connection


def create_connections(fake, count: int, *, expires_in: float = 3600) -> list[int]:
    """``count`` active connections with real tokens at ``fake``, inserted in bulk; their ids.

    Each belongs to a site user of its own and to the fake's default Brex user, the ``sub``
    of the id_tokens its refreshes return (a connection is one per owner and Brex user).
    """
    token_sets = [fake.issue_tokens() for _ in range(count)]
    return store_connections(token_sets, fake.default_user["id"], expires_in=expires_in)


def store_connections(
    token_sets: list[dict[str, Any]], brex_user_id: str, *, expires_in: float = 3600
) -> list[int]:
    """One active connection per token answer in ``token_sets`` (issued to the Brex user
    ``brex_user_id``), each with a site user of its own, inserted in bulk; their ids. For a
    process that has no fake of its own."""
    now = timezone.now()
    issued = now - timedelta(days=1)
    batch = uuid.uuid4().hex[:12]
    user_model = get_user_model()
    user_model.objects.bulk_create(
        user_model(username=f"owner-{batch}-{n}") for n in range(len(token_sets))
    )
    owners = user_model.objects.filter(username__startswith=f"owner-{batch}-").order_by("pk")
    connections = BrexConnection.objects.bulk_create(
        BrexConnection(
            owner=owner,
            environment="staging",
            brex_user_id=brex_user_id,
            granted_scopes=tokens["scope"],
        )
        for owner, tokens in zip(owners, token_sets, strict=True)
    )
    BrexToken.objects.bulk_create(
        BrexToken(
            connection=connection,
            access_token=tokens["access_token"],
            refresh_token=tokens["refresh_token"],
            access_token_expires_at=now + timedelta(seconds=expires_in),
            refresh_token_issued_at=issued,
            refresh_token_expires_at=issued + timedelta(days=90),
            refresh_token_used_at=issued,
        )
        for connection, tokens in zip(connections, token_sets, strict=True)
    )
    return [connection.pk for connection in connections]


def event_kinds(connection: BrexConnection | int) -> list[str]:
    """The kinds of a connection's events, oldest first."""
    return list(
        ConnectionEvent.objects.filter(connection=connection)
        .order_by("created_at", "pk")
        .values_list("kind", flat=True)
    )


def stored_token(connection: BrexConnection | int) -> BrexToken:
    """The token row as it is in the database now."""
    pk = connection.pk if isinstance(connection, BrexConnection) else connection
    return BrexToken.objects.select_related("connection").get(pk=pk)


class SignalRecorder:
    """Collects the kwargs of every send of the given signals, per signal name."""

    def __init__(self, **signals_by_name) -> None:
        self.signals = signals_by_name
        self.received: dict[str, list[dict[str, Any]]] = {name: [] for name in signals_by_name}
        self._receivers = {}

    def __enter__(self) -> SignalRecorder:
        for name, signal in self.signals.items():
            def receiver(sender, _name=name, **kwargs):
                self.received[_name].append({"sender": sender, **kwargs})

            self._receivers[name] = receiver
            signal.connect(receiver, weak=False)
        return self

    def __exit__(self, *exc_info) -> None:
        for name, signal in self.signals.items():
            signal.disconnect(self._receivers[name])

    def __getitem__(self, name: str) -> list[dict[str, Any]]:
        return self.received[name]
