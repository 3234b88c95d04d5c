"""The service layer: connect, refresh and revoke.

Views, tasks, management commands and admin actions call these functions and
nothing below them.
"""

from .connect import (
    CompletedConnection,
    complete_authorization,
    refuse_repeated_parameters,
    start_authorization,
)

__all__ = [
    "CompletedConnection",
    "complete_authorization",
    "refuse_repeated_parameters",
    "start_authorization",
]
