"""Connect Django users to their Brex accounts with OpenID Connect."""

from .__about__ import __version__

__all__ = ["__version__"]
