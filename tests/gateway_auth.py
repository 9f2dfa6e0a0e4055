"""An application's [gateway] authorize check, as docs/gateway.md shows: its session cookie."""

from http.cookies import SimpleCookie

from greentask.gateway.admission import Refuse

USERS = {"good-session": "alice", "banned-session": "mallory"}


def authorize(environ):
    cookie = SimpleCookie(environ.get("HTTP_COOKIE", ""))
    session = cookie.get("sessionid")
    user = USERS.get(session.value) if session else None
    if user is None:
        raise Refuse(401, "sign in first")
    if user == "mallory":
        raise Refuse(403, "your account may not run tasks")
    return user


def broken(environ):
    raise RuntimeError("the session store is down")
