"""Counting refused peers, and logging them without letting a hostile one flood the log."""

from __future__ import annotations

import logging

#: Peers remembered at once; past it the counts start again (a flood of
#: addresses must not grow memory).
MAX_PEERS = 10_000


class RefusalCounter:
    """Counts refusals per peer; logs the 1st, 10th, 100th... of each at WARNING."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self._log = log
        #: What was refused, for the log line: "connection", "handshake".
        self._what = what
        self._counts: dict[str, int] = {}

    def note(self, peer: str, reason: str) -> int:
        """Count one refusal of ``peer`` for ``reason``; return its count so far."""
        if len(self._counts) >= MAX_PEERS and peer not in self._counts:
            self._counts.clear()
        count = self._counts[peer] = self._counts.get(peer, 0) + 1
        if count == 10 ** (len(str(count)) - 1):
            self._log.warning("%s from %s refused: %s (%d time%s)", self._what, peer, reason,
                              count, "" if count == 1 else "s")
        return count
