"""What happens when…: every fault a connection can meet, and its outcome.

Each test makes the fake Brex (or the database, the key ring, the clock) misbehave in one
way and asserts the outcome: the connection's status, its tokens, its events, the signals
sent, and what the person or staff see. ``docs/faults.rst`` is this module as a table.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------
# Saving a refresh: reconnect races, malformed answers, narrower grants, a failed commit
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# Rate limits (Retry-After, the shared budget) and a wrong client secret
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# Lost keys, revocation, environments, concurrent refreshers on SQLite, the demo
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# Brex's infrastructure: token endpoint down, revocation down, discovery down, new keys
# ---------------------------------------------------------------------------------------
