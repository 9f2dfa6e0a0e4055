"""What each worker is doing, for the dashboard: its running tasks, its last failures, and
the dashboard's cancels on the way back.

Theory of operation
-------------------
No counter says which tasks run now (function, age, progress) or what the
last failures were. Writing that to shared memory at every task would tax
the hot path, so each child *publishes* it instead: once a heartbeat it
writes a small JSON document (its oldest running tasks, its last failures)
into its region of a map shared with the master, made before forking like
the scoreboard. A sequence number guards each region, as in a seqlock: odd
while the child writes, so the master never reads half a document.

The way back is a mailbox per child: the master (asked by ``POST /cancel``
on the metrics port) writes a running task's key, then bumps a count; the
child reads the new keys at its next heartbeat and cancels those tasks. A
task's key is its greenlet's id and its start time in microseconds: a
greenlet runs many tasks one after another, the pair names one of them.
"""

from __future__ import annotations

import mmap
from typing import Any

import ujson

#: Bytes of each child's published document.
DOCUMENT_BYTES = 32 * 1024
#: Running tasks each child publishes (its oldest), and failures it keeps.
RUNNING_SHOWN = 50
FAILURES_KEPT = 50
#: Cancels a mailbox holds between two heartbeats of its child.
MAILBOX = 16
#: How often the master tries again to read a document the child is writing.
READ_TRIES = 3

TaskKey = tuple[int, int]


def shown_progress(value: Any, debug: bool) -> Any:
    """What the dashboard shows of a task's last progress value: only its numbers
    (a number, or a dict's number values), unless ``debug`` is on."""
    if debug:
        return value
    if isinstance(value, dict):
        return {key: number for key, number in value.items() if _is_number(number)} or None
    return value if _is_number(value) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class ActivityBoard:
    """``capacity`` documents and mailboxes in anonymous shared memory; make it before forking.

    Each child is the only writer of its document and the only reader of its
    mailbox; the master the only reader of the documents and writer of the
    mailboxes.
    """

    def __init__(self, capacity: int) -> None:
        self._memory = mmap.mmap(-1, capacity * DOCUMENT_BYTES)
        # Per child: its sequence number and its document's length.
        self._header_memory = mmap.mmap(-1, capacity * 2 * 8)
        self._headers = memoryview(self._header_memory).cast("d")
        # Per child: how many cancels were ever posted, then MAILBOX keys.
        self._mail_width = 1 + 2 * MAILBOX
        self._mail_memory = mmap.mmap(-1, capacity * self._mail_width * 8)
        self._mail = memoryview(self._mail_memory).cast("d")

    def clear(self, index: int) -> None:
        """Empty child ``index``'s document and mailbox (for a new child)."""
        self._headers[2 * index] = self._headers[2 * index + 1] = 0
        base = index * self._mail_width
        for cell in range(base, base + self._mail_width):
            self._mail[cell] = 0

    # -- the child's side --------------------------------------------------

    def publish(self, index: int, document: dict[str, Any]) -> None:
        """Write child ``index``'s document; list entries are dropped until it fits."""
        data = ujson.dumps(document).encode()
        while len(data) > DOCUMENT_BYTES:
            longest = max((key for key, value in document.items() if isinstance(value, list)),
                          key=lambda key: len(document[key]))
            document[longest] = document[longest][:len(document[longest]) // 2]
            data = ujson.dumps(document).encode()
        headers, start = self._headers, index * DOCUMENT_BYTES
        headers[2 * index] += 1  # odd: being written
        self._memory[start:start + len(data)] = data
        headers[2 * index + 1] = len(data)
        headers[2 * index] += 1

    def posted(self, index: int, seen: int) -> tuple[list[TaskKey], int]:
        """The cancels posted to child ``index`` after the first ``seen``; and the new count."""
        base = index * self._mail_width
        count = int(self._mail[base])
        keys = []
        for number in range(max(seen, count - MAILBOX), count):
            cell = base + 1 + 2 * (number % MAILBOX)
            keys.append((int(self._mail[cell]), int(self._mail[cell + 1])))
        return keys, count

    # -- the master's side -------------------------------------------------

    def read(self, index: int) -> dict[str, Any] | None:
        """Child ``index``'s last document; None before its first, or while it writes."""
        headers, start = self._headers, index * DOCUMENT_BYTES
        for _ in range(READ_TRIES):
            sequence = headers[2 * index]
            if not sequence or int(sequence) % 2:
                continue
            data = self._memory[start:start + int(headers[2 * index + 1])]
            if headers[2 * index] == sequence:
                try:
                    return ujson.loads(data)
                except ValueError:
                    return None
        return None

    def of(self, index: int) -> ChildActivity:
        """Child ``index``'s side of the board."""
        return ChildActivity(self, index)

    def post(self, index: int, key: TaskKey) -> None:
        """Ask child ``index`` to cancel the task ``key`` at its next heartbeat."""
        base = index * self._mail_width
        count = int(self._mail[base])
        cell = base + 1 + 2 * (count % MAILBOX)
        self._mail[cell], self._mail[cell + 1] = key
        self._mail[base] = count + 1  # last: the child reads only up to the count


class ChildActivity:
    """One child's document and mailbox, seen from the child."""

    def __init__(self, board: ActivityBoard, index: int) -> None:
        self.board = board
        self.index = index
        self._seen = 0

    def publish(self, document: dict[str, Any]) -> None:
        """Replace this child's document."""
        self.board.publish(self.index, document)

    def new_cancels(self) -> list[TaskKey]:
        """The keys posted since the last call."""
        keys, self._seen = self.board.posted(self.index, self._seen)
        return keys
