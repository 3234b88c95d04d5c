"""Refresh the Brex connections that are due, in this process (for cron instead of Celery)."""

from __future__ import annotations

import time

from django.core.management.base import BaseCommand, CommandError

from django_brex_oauth.services.sweep import SweepReport, sweep


class Command(BaseCommand):
    help = (
        "Refresh the tokens of every Brex connection that is due (the access token expires "
        "within REFRESH_MARGIN, or the refresh token has been idle for "
        "REFRESH_TOKEN_REFRESH_AGE), like the Celery beat sweep but without Celery. "
        "Connections another worker is refreshing are skipped. Exits with status 1 when any "
        "refresh failed (Brex unreachable, 429, 5xx, or another refusal that left the "
        "connection active), so cron can alert; those connections are tried again on the next "
        "run. Connections Brex refused for good become needs_reauth and do not fail the run. "
        "The run takes its token requests from the shared SWEEP_RATE_LIMIT budget (waiting "
        "for the next window when it is used up); while Brex asks to wait (Retry-After) it "
        "sends nothing more and defers the rest to a later run. When Brex refuses the client "
        "credentials, refreshing pauses for every connection (they stay active) and the run "
        "exits with status 1."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--all",
            action="store_true",
            dest="all_active",
            help="Refresh every active connection now, due or not.",
        )

    def handle(self, *args, all_active: bool = False, **options):
        verbosity = int(options.get("verbosity", 1))
        interactive = verbosity >= 1 and self.stdout.isatty()
        started = time.monotonic()
        last_line = 0.0

        def progress(done: int, total: int, report: SweepReport) -> None:
            nonlocal last_line
            now = time.monotonic()
            if interactive:
                if done == total or now - last_line >= 0.1:
                    self.stdout.write(f"\r{self._line(done, total, report)}", ending="")
                    self.stdout.flush()
                    last_line = now
            elif verbosity >= 2 and (done == total or now - last_line >= 5):
                self.stdout.write(self._line(done, total, report))
                last_line = now

        report = sweep(all_active=all_active, progress=progress)
        if interactive and report.total:
            self.stdout.write("")
        elapsed = time.monotonic() - started
        summary = (
            f"{'All active' if all_active else 'Due'} connections: {report.total} in "
            f"{elapsed:.1f} s. refreshed {report.refreshed}, skipped {report.skipped}, "
            f"failed {report.failed}, needs re-auth {report.needs_reauth}, "
            f"deferred {report.deferred}."
        )
        if report.held_back:
            summary += f" Deferred: {report.held_back}"
        if report.failed or report.needs_reauth or report.deferred:
            self.stdout.write(self.style.WARNING(summary))
        else:
            self.stdout.write(self.style.SUCCESS(summary))
        if report.paused:
            raise CommandError(
                "Brex refused this site's client credentials: refreshing is paused for every "
                "connection (they stay active). Fix BREX_OAUTH CLIENT_ID / CLIENT_SECRET; "
                "refreshing resumes by itself once they work (manage.py brex_oauth_check)."
            )
        if report.failed:
            raise CommandError(
                f"{report.failed} refresh(es) failed; see the connections' last error. They "
                "are tried again on the next run."
            )

    @staticmethod
    def _line(done: int, total: int, report: SweepReport) -> str:
        return (
            f"[{done}/{total}] refreshed {report.refreshed}, skipped {report.skipped}, "
            f"failed {report.failed}, needs re-auth {report.needs_reauth}, "
            f"deferred {report.deferred}"
        )
