from django.apps import AppConfig


class TeamsAppConfig(AppConfig):
    name = "tests.teams_app"
    label = "teams_app"
    default_auto_field = "django.db.models.BigAutoField"
