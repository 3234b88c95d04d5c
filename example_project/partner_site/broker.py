"""A file broker for the example site whose messages appear whole or not at all.

kombu's ``filesystem://`` transport creates a message file and then writes it, while a
worker polling the folder moves and reads any file whose name matches: it can take a file
that is still empty and crash on it. Writing under a name no reader matches and renaming
the finished file into place makes each message appear at once (a rename within one folder
is atomic on POSIX and Windows).
"""

from __future__ import annotations

import os
import uuid
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    """The filesystem channel with an atomic ``_put``."""

    def _put(self, queue, payload, **kwargs):
        name = f"{int(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        # "…msg.partial" has a different suffix, so readers skip it until it is renamed.
        partial = final + ".partial"
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {name!r} to directory") from exc


class Transport(filesystem.Transport):
    """``filesystem://`` with :class:`Channel`; named by ``CELERY_BROKER_TRANSPORT``."""

    Channel = Channel
