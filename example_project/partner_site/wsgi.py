"""WSGI entry point of the example partner site."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "partner_site.settings")

application = get_wsgi_application()
