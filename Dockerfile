# greentask in a container. The default command is the task daemon; the same
# image runs the WebSocket gateway (see docker-compose.yml):
#   docker build -t greentask .
#   docker run --rm -p 127.0.0.1:12345:12345 greentask
#   docker run --rm -p 127.0.0.1:8080:8080 greentask \
#       gunicorn -c conf/gunicorn.conf.py -b 0.0.0.0:8080 greentask.ws:app
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /app
COPY requirements.txt setup.py README.md ./
COPY greentask ./greentask
COPY conf ./conf
# A slim image has no C compiler, so the hot path runs as Python here (setup.py
# compiles it where mypyc and a compiler are installed: docs/performance.md).
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --no-create-home --home-dir /app greentask
USER greentask

# Inside a container the task port must listen on the container's interface.
# Anyone who reaches it can run tasks: publish it only on a private network.
ENV GREENTASK_WORKER_BIND=0.0.0.0:12345 \
    GREENTASK_GATEWAY_TASK_SERVERS=127.0.0.1:12345
EXPOSE 12345 8080

# TERM is greentask's (and gunicorn's) graceful stop; give `docker stop -t`
# more than [worker] graceful_timeout.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
    CMD ["greentask", "call", "echo", "--timeout", "3"]

CMD ["python", "-m", "greentask.worker", "-c", "conf/worker.ini"]
