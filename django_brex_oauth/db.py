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
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, cast

from django.apps import apps
from django.db import connections, transaction
from django.db.models import Model, QuerySet
from django.db.models.sql import UpdateQuery

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


def update_sql(queryset: QuerySet, values: dict[str, Any]) -> tuple[str, tuple[Any, ...]]:
    """The ``UPDATE`` statement (SQL and parameters) that ``queryset.update(**values)``
    would run, for composing into a larger statement. The queryset's filters must be on
    its own table (a join becomes a subquery, whose rows a concurrent writer's commit does
    not re-check)."""
    query = cast(UpdateQuery, queryset.query.chain(UpdateQuery))
    query.add_update_values(values)
    sql, params = query.get_compiler(queryset.db).as_sql()
    return sql, tuple(params)


def from_row(model: type[Model], using: str, values: Sequence[Any]) -> Model:
    """An instance of ``model`` from a row of its concrete fields' columns, in their
    order, converted as the ORM converts what it reads (``from_db_value``, the backend's
    converters)."""
    connection = connections[using]
    cache = _row_converters.setdefault(connection, {})
    if model not in cache:
        fields = model._meta.concrete_fields
        columns = [field.get_col(model._meta.db_table) for field in fields]
        cache[model] = (
            [field.attname for field in fields],
            [
                (column, (*connection.ops.get_db_converters(column),
                          *field.get_db_converters(connection)))
                for field, column in zip(fields, columns, strict=True)
            ],
        )
    names, converters = cache[model]
    converted = []
    for (column, column_converters), value in zip(converters, values, strict=True):
        for converter in column_converters:
            value = converter(value, column, connection)
        converted.append(value)
    return model.from_db(using, names, converted)


def cache_related(instance: Model, field_name: str, related: Model) -> None:
    """Make ``instance.<field_name>`` (a forward relation) read ``related`` without a query.

    Unlike assigning through the relation's descriptor, this does not also cache
    ``instance`` on ``related`` (Django's one-to-one descriptor does both): that back
    reference makes a reference cycle, which only the garbage collector frees. The refresh
    path made two such cycles per connection, and the collections they brought on, each
    walking every object the process holds, cost it more than its own Python did."""
    field = cast(Any, instance._meta.get_field(field_name))
    field.set_cached_value(instance, related)


#: from_row()'s field names and converters, by database connection (some are its methods)
#: and model: the same for every row, and finding them costs more than converting.
_row_converters: weakref.WeakKeyDictionary[Any, dict[type[Model], tuple[list[str], list]]] = (
    weakref.WeakKeyDictionary()
)
