"""The service layer: connect, refresh, revoke, and the rest of what the app does.

Views, tasks, management commands and admin actions call these modules and nothing below
them; a service queues a task by its name (:mod:`.queue`) and never imports ``tasks``.
Import the module you need (``from django_brex_oauth.services import refresh``): this
package imports none of them, so that importing one never runs another.
"""
