"""The site's team model: a workspace and the users who are its members."""

from django.conf import settings
from django.db import models


class Workspace(models.Model):
    """A customer's workspace. Its members may connect a Brex account for it, and all of
    them see (and may disconnect) its connections: the app's default team policy reads
    membership from ``members``."""

    name = models.CharField(max_length=100, unique=True)
    members = models.ManyToManyField(
        settings.AUTH_USER_MODEL, related_name="workspaces", blank=True
    )

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name
