"""The site's Celery app: configured from Django settings (``CELERY_*``), tasks autodiscovered.

Run a worker and beat from ``example_project/``::

    celery -A partner_site worker --pool solo --loglevel INFO
    celery -A partner_site beat --loglevel INFO
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "partner_site.settings")

app = Celery("partner_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
