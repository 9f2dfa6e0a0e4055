"""A connection's phases, and the moves between them.

A connection is in one :class:`Phase` at a time, changed only by
:meth:`~greentask.daemon.connection.Connection._enter`, which checks the
move against :data:`PHASE_MOVES` (:func:`greentask.daemon.lifecycle.check_move`).
"""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    """Where a connection is in its life."""

    #: The server requires a token, and the peer has not sent it yet.
    HELLO = "hello"
    #: Reading and running requests.
    OPEN = "open"
    #: Told the pipelining peer ``{"closing": true}``; still answering what it sends.
    ASKED_TO_CLOSE = "asked to close"
    #: Reading no more: the replies go out, then the connection closes.
    CLOSING = "closing"


# For the per-line tests: a module global is found faster than an Enum member.
OPEN, ASKED_TO_CLOSE, CLOSING = Phase.OPEN, Phase.ASKED_TO_CLOSE, Phase.CLOSING

#: The phases each phase may move to.
PHASE_MOVES: dict[Phase, frozenset[Phase]] = {
    Phase.HELLO: frozenset({Phase.OPEN, Phase.CLOSING}),
    Phase.OPEN: frozenset({Phase.ASKED_TO_CLOSE, Phase.CLOSING}),
    Phase.ASKED_TO_CLOSE: frozenset({Phase.CLOSING}),
    Phase.CLOSING: frozenset(),
}
