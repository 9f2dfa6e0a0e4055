"""gunicorn settings for the greentask WebSocket gateway.

    gunicorn -c conf/gunicorn.conf.py greentask.ws:app

Flags on the command line win over this file (-b HOST:PORT, -w N). The
gateway's own settings are the [gateway] section of the file named by
GREENTASK_CONFIG (default conf/worker.ini).
"""

import os
import sys

from greentask.config import check_gateway_tls, load
from greentask.errors import ConfigError

# A wrong [gateway] setting stops gunicorn here, in its master, with one line
# and status 2, as the daemon does: not a worker's traceback and status 3.
try:
    check_gateway_tls(load(os.environ.get("GREENTASK_CONFIG", "conf/worker.ini")))
except ConfigError as exc:
    print(f"greentask gateway: {exc}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None

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


# /metrics must sum every worker, not only the one a scrape reaches:
# prometheus_client's multiprocess mode keeps the counts in files under
# PROMETHEUS_MULTIPROC_DIR. It must be set before the workers import
# prometheus_client, so here, in the master (an existing value is kept).
_made_metrics_dir = None


def on_starting(server):
    import os
    import tempfile

    global _made_metrics_dir
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _made_metrics_dir = tempfile.mkdtemp(prefix="greentask-gateway-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = _made_metrics_dir
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):  # counts of an earlier run
        if name.endswith(".db"):
            os.unlink(os.path.join(directory, name))


def child_exit(server, worker):
    from prometheus_client import multiprocess

    # A dead worker's open-socket gauge must stop counting.
    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    import shutil

    if _made_metrics_dir:
        shutil.rmtree(_made_metrics_dir, ignore_errors=True)
