"""Transactions that hold their locks on every supported database.

``select_for_update()`` locks rows on PostgreSQL and does nothing on SQLite. There, a
transaction begun with a plain ``BEGIN`` (deferred, SQLite's default) takes the database's
read lock at its first read and asks for the write lock only at its first write; when two
such transactions have both read, the second to write is refused at once with "database
is locked" (waiting could only deadlock), whatever the busy timeout. A refresh that has
just been given a rotated refresh token by Brex would lose it that way, and the next
refresher would present the rotated-out one again: Brex may then revoke the whole grant.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from django.apps import apps
from django.db import transaction

#: ``BEGIN`` modes that take SQLite's write lock at once.
_WRITING_MODES = frozenset({"IMMEDIATE", "EXCLUSIVE"})


@contextlib.contextmanager
def write_transaction(using: str | None = None) -> Iterator[None]:
    """``transaction.atomic()`` that, on SQLite, takes the write lock before anything else.

    Its first statement is then a write that changes nothing, which waits for the lock
    (up to the connection's busy timeout) instead of failing the way a write after a read
    does. Inside an outer transaction, or with ``"transaction_mode": "IMMEDIATE"`` in the
    database's ``OPTIONS``, there is nothing to add; on other databases neither.
    """
    with transaction.atomic(using=using):
        connection = transaction.get_connection(using)
        if (
            connection.vendor == "sqlite"
            and str(getattr(connection, "transaction_mode", None) or "").upper()
            not in _WRITING_MODES
        ):
            table = connection.ops.quote_name(
                apps.get_model("brex_oauth", "BrexToken")._meta.db_table
            )
            with connection.cursor() as cursor:
                cursor.execute(
                    f"UPDATE {table} SET refresh_claimed_by = refresh_claimed_by WHERE 0"
                )
        yield
