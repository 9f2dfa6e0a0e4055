"""The WebSocket gateway: a WSGI app for gunicorn's GeventWebSocketWorker."""
