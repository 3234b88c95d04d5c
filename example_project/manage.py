#!/usr/bin/env python
"""Django's command-line utility for the example partner site."""

import os
import sys


def main() -> None:
    """Run a management command with the partner site's settings."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "partner_site.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
