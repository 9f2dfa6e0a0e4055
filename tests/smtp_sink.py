"""A real SMTP server for tests and scripts/bench --mail: aiosmtpd keeping every envelope."""

from __future__ import annotations

import asyncio
import threading


class Inbox:
    """aiosmtpd handler: keeps each accepted envelope.

    ``refuse``: an address answered 550. ``delay``: seconds taken per message
    (a slow mail server). ``cut_after_data``: an address whose message is
    kept, but whose session is cut before the reply (a lost 250).
    """

    def __init__(self, refuse: str | None = None, delay: float = 0.0,
                 cut_after_data: str | None = None) -> None:
        self.refuse = refuse
        self.delay = delay
        self.cut_after_data = cut_after_data
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.sessions = 0
        self.lock = threading.Lock()

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        with self.lock:
            self.sessions += 1
        session.host_name = hostname
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address == self.refuse:
            return "550 no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.delay:
            await asyncio.sleep(self.delay)
        with self.lock:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        if self.cut_after_data in envelope.rcpt_tos:
            server.transport.abort()
        return "250 Message accepted for delivery"

    def recipients(self) -> list[str]:
        """Every delivered recipient, once per delivery."""
        with self.lock:
            return [rcpt for _, rcpts, _ in self.messages for rcpt in rcpts]
