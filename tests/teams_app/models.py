"""A partner's own team model, as the team-owned connection tests use it."""

from django.conf import settings
from django.db import models


class Team(models.Model):
    """A workspace of the partner's site, with its members."""

    name = models.CharField(max_length=100)
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, related_name="teams", blank=True)

    def __str__(self) -> str:
        return self.name
