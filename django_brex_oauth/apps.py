from django.apps import AppConfig
from django.db.models.signals import pre_delete
from django.utils.translation import gettext_lazy as _

from .http import silence_secret_logging


class BrexOAuthConfig(AppConfig):
    name = "django_brex_oauth"
    label = "brex_oauth"
    # The admin's heading and breadcrumb: "Brex OAuth › Brex connections", not the model's
    # plural twice.
    verbose_name = _("Brex OAuth")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Importing them registers the system checks; like the receiver below, they need
        # the models, which Django imports only after every app's AppConfig.
        from . import checks, team_schema  # noqa: F401
        from .services.detached import revoke_when_deleted  # needs the models too

        silence_secret_logging()
        # However a connection is deleted (its owner deleted, a queryset, the admin), its
        # grant at Brex is revoked: the token is kept for that before the rows go.
        pre_delete.connect(
            revoke_when_deleted, sender="brex_oauth.BrexConnection",
            dispatch_uid="brex_oauth.revoke_when_deleted",
        )
