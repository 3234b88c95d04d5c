from django.apps import AppConfig


class PartnerSiteConfig(AppConfig):
    """The example site's own pages, templates and the ``demo_user`` command."""

    name = "partner_site"
    verbose_name = "Partner site"
