"""The bare reference for scripts/bench: a gevent StreamServer bound once and forked.

It echoes each JSON request line's args back with ujson, or, for the sleep
function, sleeps ``args[0]`` seconds in the connection's greenlet first, and
does nothing else: no validation, ids, timeouts, pools or counters. greentask's overhead is
measured against it. Usage: reference_server.py PORT PROCESSES
"""

import os
import signal
import socket
import sys

PORT, PROCESSES = int(sys.argv[1]), int(sys.argv[2])
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", PORT))
listener.listen(2048)
children = []
for _ in range(PROCESSES):
    pid = os.fork()
    if pid == 0:
        break
    children.append(pid)
else:  # the parent waits; SIGTERM ends the children too
    signal.signal(signal.SIGTERM, lambda *_: [os.kill(pid, 9) for pid in children])
    for pid in children:
        os.waitpid(pid, 0)
    sys.exit(0)

from gevent import monkey  # noqa: E402  (the child patches after the fork)

monkey.patch_all()
import gevent  # noqa: E402
import gevent.socket  # noqa: E402
import ujson  # noqa: E402
from gevent.server import StreamServer  # noqa: E402


def handle(sock, address):
    try:
        serve(sock)
    except ConnectionError:  # the load generator closes with a reset
        pass


def answer(line):
    request = ujson.loads(line)
    if request.get("function") == "sleep":
        gevent.sleep(request["args"][0])
        return ujson.dumps({"ok": True, "result": None})
    return ujson.dumps({"ok": True, "result": request.get("args")})


def serve(sock):
    buffer = b""
    while data := sock.recv(65536):
        *lines, buffer = (buffer + data).split(b"\n")
        replies = [answer(line) for line in lines if line]
        if replies:
            sock.sendall(("\n".join(replies) + "\n").encode())


server = StreamServer(gevent.socket.socket(fileno=listener.detach()), handle)
server.max_accept = 1
server.serve_forever()
