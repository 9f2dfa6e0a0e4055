"""gunicorn settings for the greentask WebSocket gateway.

    gunicorn -c conf/gunicorn.conf.py greentask.ws:app

Flags on the command line win over this file (-b HOST:PORT, -w N). The
gateway's own settings are the [gateway] section of the file named by
GREENTASK_CONFIG (default conf/worker.ini).
"""

worker_class = "geventwebsocket.gunicorn.workers.GeventWebSocketWorker"
bind = "127.0.0.1:8080"
workers = 1
# Sockets per worker process; each browser tab holds one.
worker_connections = 10000
# gevent workers beat their heartbeat from the event loop, so a long-lived
# WebSocket does not trip this; a blocked loop does.
timeout = 30
graceful_timeout = 10
keepalive = 5
accesslog = "-"
# gunicorn 27 opens a control socket under ~/.gunicorn by default; the gateway
# needs none.
control_socket_disable = True
