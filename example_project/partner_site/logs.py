"""Logging helpers of the example site."""

from __future__ import annotations

import logging
import re

#: Query parameters of the OAuth callback that are credentials for a short while.
_SECRET_PARAMETER = re.compile(r"\b(code|state|session_state)=[^&\s\"']+")


class RedactOAuthParameters(logging.Filter):
    """Replace the values of ``code=`` and ``state=`` in a record's message.

    runserver logs every request line, and the callback's request line carries the
    authorization code; the record is rewritten before any handler formats it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _SECRET_PARAMETER.sub(r"\1=[redacted]", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True
