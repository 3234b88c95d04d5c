"""Queueing the app's own Celery tasks by name, so that services never import ``tasks``."""

from __future__ import annotations

from importlib import import_module

from celery import current_app

#: The prefix of the names of the tasks in :mod:`django_brex_oauth.tasks` that take Celery's
#: default name (the module and the function).
TASKS = "django_brex_oauth.tasks."


def send_task(name: str, args: tuple = (), *, countdown: float | None = None) -> None:
    """Queue the app's task ``name`` (e.g. ``"brex_oauth.process_webhook_event"``).

    Goes through the task object, not ``app.send_task``, so that ``task_always_eager``
    still runs it at once. Raises whatever the broker raises.
    """
    # Registers the app's tasks with Celery when nothing has imported them yet (a web
    # process whose Celery app discovers tasks lazily).
    import_module("django_brex_oauth.tasks")
    current_app.tasks[name].apply_async(args, countdown=countdown)
