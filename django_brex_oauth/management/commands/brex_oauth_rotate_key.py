"""Re-encrypt every stored token with the current BREX_OAUTH["ENCRYPTION_KEY"]."""

from django.core.management.base import BaseCommand
from django.db import transaction
from django.views.decorators.debug import sensitive_variables

from django_brex_oauth.models import AuthorizationRequest, BrexToken, DetachedRevocation


class Command(BaseCommand):
    help = (
        "Re-encrypt stored Brex tokens with BREX_OAUTH['ENCRYPTION_KEY'], in the current "
        "(unpickled) format. Run it after upgrading, and after "
        "moving the old key to ENCRYPTION_KEY_FALLBACKS; then the old key can be dropped."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--batch-size", type=int, default=500,
            help="Tokens re-encrypted per transaction (500).",
        )

    # Saving a row puts the plaintext tokens in the ORM's frames (``values``) below this one.
    @sensitive_variables()
    def handle(self, *args, batch_size: int, **options):
        done = 0
        pks = list(BrexToken.objects.order_by("pk").values_list("pk", flat=True))
        for start in range(0, len(pks), batch_size):
            with transaction.atomic():
                batch = BrexToken.objects.select_for_update().filter(
                    pk__in=pks[start : start + batch_size]
                )
                for token in batch:
                    token.save(update_fields=["access_token", "refresh_token"])
                    done += 1
        # Used and expired ones too: the admin lists them until the prune task removes them.
        pending = 0
        for auth_request in AuthorizationRequest.objects.order_by("pk").iterator():
            auth_request.save(update_fields=["code_verifier"])
            pending += 1
        # Tokens of deleted connections still waiting for Brex to confirm their revocation.
        detached = 0
        for pk in list(DetachedRevocation.objects.order_by("pk").values_list("pk", flat=True)):
            with transaction.atomic():
                # Locked, and skipped if Brex confirmed (and the row went) in the meantime.
                revocation = DetachedRevocation.objects.select_for_update().filter(pk=pk).first()
                if revocation is not None:
                    revocation.save(update_fields=["token"])
                    detached += 1
        self.stdout.write(
            self.style.SUCCESS(
                f"Re-encrypted the tokens of {done} connection(s), {pending} "
                f"authorization request(s) and {detached} deleted connection(s) awaiting "
                "revocation with the current key."
            )
        )
