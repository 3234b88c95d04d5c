"""List the webhook subscriptions stored here and at Brex; ``--sync`` reconciles them."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from django_brex_oauth.services import webhook_reconcile, webhook_subscriptions


class Command(BaseCommand):
    help = (
        "List Brex webhook subscriptions: those stored for each connection and those Brex "
        "holds for each company with an active connection. With --sync, make Brex match "
        "BREX_OAUTH['WEBHOOK_URL'] and WEBHOOK_EVENT_TYPES: retry pending subscriptions and "
        "deletions, subscribe active connections that have none, update changed ones, and "
        "delete subscriptions for WEBHOOK_URL that this site does not know. Exits 1 when "
        "something failed."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--sync", action="store_true", help="Reconcile with Brex instead of only listing."
        )

    def handle(self, *args, sync: bool = False, **options):
        if sync:
            report = webhook_reconcile.reconcile()
            for line in report.lines or ["Nothing to change."]:
                self.stdout.write(line)
            if report.failures:
                raise CommandError(f"{report.failures} change(s) failed; see above.")
            self.stdout.write(self.style.SUCCESS("Brex's webhook subscriptions match."))
            return
        self._list()

    def _list(self) -> None:
        wanted = webhook_subscriptions.configured()
        self.stdout.write(
            f"Configured: {', '.join(wanted[1])} at {wanted[0]}" if wanted
            else "Configured: no event types (WEBHOOK_EVENT_TYPES is empty)"
        )
        self.stdout.write("Stored here:")
        rows = webhook_reconcile.stored()
        for s in rows:
            self.stdout.write(
                f"  {s.brex_webhook_id or '-':<24} connection {s.connection_id:<6} "
                f"{s.status:<13} {', '.join(s.event_types)} {s.url}"
            )
        if not rows:
            self.stdout.write("  none")
        known = {s.brex_webhook_id for s in rows if s.brex_webhook_id}
        failed = False
        for view in webhook_reconcile.survey():
            self.stdout.write(f"At Brex, company {view.company_id} "
                              f"(asked with connection {view.connection.pk}):")
            if view.error:
                failed = True
                self.stdout.write(self.style.ERROR(f"  could not list: {view.error}"))
                continue
            for item in view.at_brex:
                mark = "" if str(item.get("id")) in known else "  (not known here)"
                self.stdout.write(
                    f"  {item.get('id', '-'):<24} {item.get('status', '-'):<13} "
                    f"{', '.join(item.get('event_types') or [])} {item.get('url')}{mark}"
                )
            if not view.at_brex:
                self.stdout.write("  none")
        if failed:
            raise CommandError("Brex could not be asked for every company; see above.")
