"""The bare reference gateway for scripts/bench --gateway: gevent-websocket, no protocol logic.

The seed's pattern and nothing more: each WebSocket message opens a TCP
connection to the task port, sends ``{"function": "echo", "args": [TEXT]}``,
reads the reply line and answers ``task complete``; no admission, limits,
JSON events, pools or counters. Run under gunicorn with the design card's
worker class, with TASK_PORT in the environment:

    TASK_PORT=12345 gunicorn -k geventwebsocket.gunicorn.workers.GeventWebSocketWorker \\
        --pythonpath scripts -b 127.0.0.1:8090 reference_gateway:app
"""

import os

import gevent
import ujson
from gevent import socket

TASK_ADDRESS = ("127.0.0.1", int(os.environ.get("TASK_PORT", "12345")))


def run_task(ws, message):
    with socket.create_connection(TASK_ADDRESS) as task:
        task.sendall(ujson.dumps({"function": "echo", "args": [message]}).encode() + b"\n")
        task.makefile("rb").readline()
    ws.send("task complete")


def app(environ, start_response):
    ws = environ.get("wsgi.websocket")
    if ws is None:
        start_response("400 Bad Request", [("Content-Length", "0")])
        return [b""]
    while True:
        message = ws.receive()
        if message is None:
            return []
        gevent.spawn(run_task, ws, message)
