"""``POST /api/v1/login`` and ``POST /api/v1/logout``: a session instead of credentials on
every request (the web pages' login form calls :func:`fieldgate.hub.auth.log_in` the same
way).

- ``POST /api/v1/login`` ``{"name", "password"}`` (JSON or a form) → ``200 {"name",
  "admin", "domains"}`` and the session cookie; ``401`` wrong; ``429`` too many failures
- ``POST /api/v1/logout`` → ``204``, the cookie cleared
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from fieldgate.hub.auth import log_in, log_out
from fieldgate.hub.web import ApiError

account = Blueprint("account", __name__, url_prefix="/api/v1")


@account.post("/login")
def login() -> Response:
    body = request.get_json(silent=True) if request.is_json else request.form
    if not hasattr(body, "get"):
        body = {}
    name, password = body.get("name"), body.get("password")
    if not isinstance(name, str) or not isinstance(password, str) or not name:
        raise ApiError(400, "log in with a 'name' and a 'password' (JSON or a form)")
    who = log_in(name, password)
    return jsonify(name=who.name, admin=who.admin, domains=sorted(who.domains))


@account.post("/logout")
def logout() -> tuple[str, int]:
    log_out()
    return "", 204
