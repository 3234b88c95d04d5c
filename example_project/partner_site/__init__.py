"""An example Brex partner site built on django-brex-oauth."""

from .celery import app as celery_app

__all__ = ["celery_app"]
