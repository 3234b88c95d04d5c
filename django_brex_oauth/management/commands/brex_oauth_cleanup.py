"""Prune expired authorization requests and old events, and retry pending revocations."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from django_brex_oauth.services.cleanup import prune
from django_brex_oauth.services.detached import (
    pending_detached_ids,
    retry_pending_revocations,
)
from django_brex_oauth.services.revoke import pending_revocation_ids


class Command(BaseCommand):
    help = (
        "Delete expired Brex authorization requests and connection events older than "
        "BREX_OAUTH['EVENT_RETENTION_DAYS'] (refresh events: REFRESH_EVENT_RETENTION_DAYS), "
        "then ask Brex again to revoke every disconnected connection whose revocation it has "
        "not confirmed, and every deleted connection's token still to revoke (like the Celery "
        "prune and revocation sweep tasks, for sites that run cron instead)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Only count what would be deleted and retried; change nothing.",
        )
        parser.add_argument(
            "--skip-revocations",
            action="store_true",
            help="Do not retry pending revocations at Brex.",
        )

    def handle(self, *args, dry_run: bool = False, skip_revocations: bool = False, **options):
        result = prune(dry_run=dry_run)
        verb = "Would delete" if dry_run else "Deleted"
        self.stdout.write(
            self.style.SUCCESS(
                f"{verb} {result.authorization_requests} expired authorization request(s) "
                f"and {result.events} old event(s)."
            )
        )
        if result.webhook_events:
            self.stdout.write(f"{verb} {result.webhook_events} old webhook event(s).")
        if skip_revocations:
            return
        if dry_run:
            count = sum(1 for _ in pending_revocation_ids()) + sum(
                1 for _ in pending_detached_ids()
            )
            self.stdout.write(f"Would retry {count} pending revocation(s) at Brex.")
            return
        report = retry_pending_revocations()
        line = (
            f"Pending revocations: {report.total}; revoked at Brex {report.revoked}, "
            f"failed {report.failed}, skipped {report.skipped}."
        )
        self.stdout.write(self.style.WARNING(line) if report.failed else self.style.SUCCESS(line))
