from django.apps import AppConfig


class BrexOAuthConfig(AppConfig):
    name = "django_brex_oauth"
    label = "brex_oauth"
    verbose_name = "Brex connections"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)
        from .http import silence_secret_logging

        silence_secret_logging()
