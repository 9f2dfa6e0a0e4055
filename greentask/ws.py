"""``gunicorn -k geventwebsocket.gunicorn.workers.GeventWebSocketWorker greentask.ws:app``.

The design card's entry point; the gateway itself is :mod:`greentask.gateway`.
"""

from greentask.gateway.app import Gateway, app

__all__ = ["Gateway", "app"]
