"""Error classes shared by the HIL client, the HIL server and the CLI.

Every API-level error of HIL's v0 API is a ``{"type", "msg"}`` body with a fixed HTTP
status. The classes below carry that status so the server can answer with it and the
client can raise the same class when it reads the body back.
"""

from __future__ import annotations


class RhaasError(Exception):
    """Base of every error rhaas reports to an operator as one line."""

    exit_code = 1


class UsageError(RhaasError):
    exit_code = 2


class UpstreamUnreachable(RhaasError):
    """The upstream HaaS did not answer (refused, timed out, DNS)."""

    exit_code = 3


class StoreError(RhaasError):
    """The inventory cannot be used: damaged, unsafe (owner, mode), unreadable or unwritable.

    Nothing was changed. The README's "Exit codes" section says how to recover.
    """

    exit_code = 4


class NoInventoryError(StoreError):
    """There is no inventory at RHAAS_HOME yet: run ``rhaas init`` (a usage error)."""

    exit_code = 2


class APIError(RhaasError):
    """An error with a HIL type name and HTTP status."""

    status = 500
    type_name = "ServerError"

    def __init__(self, msg: str = "", status: int | None = None):
        super().__init__(msg)
        self.msg = msg
        if status is not None:
            self.status = status

    @property
    def type(self) -> str:
        return self.type_name

    def body(self) -> dict:
        return {"type": self.type_name, "msg": self.msg}

    def __str__(self) -> str:
        return f"{self.type_name}: {self.msg}" if self.msg else self.type_name


def _api(name: str, status: int) -> type[APIError]:
    cls = type(name, (APIError,), {"status": status, "type_name": name})
    return cls


ValidationError = _api("ValidationError", 400)
BadArgumentError = _api("BadArgumentError", 400)
AuthorizationError = _api("AuthorizationError", 401)
NotFoundError = _api("NotFoundError", 404)
DuplicateError = _api("DuplicateError", 409)
BlockedError = _api("BlockedError", 409)
ProjectMismatchError = _api("ProjectMismatchError", 409)
IllegalStateError = _api("IllegalStateError", 409)
ServerError = _api("ServerError", 500)
OBMError = _api("OBMError", 500)
MethodNotAllowed = _api("MethodNotAllowed", 405)

API_ERRORS: dict[str, type[APIError]] = {
    c.type_name: c
    for c in (
        ValidationError,
        BadArgumentError,
        AuthorizationError,
        NotFoundError,
        DuplicateError,
        BlockedError,
        ProjectMismatchError,
        IllegalStateError,
        ServerError,
        OBMError,
        MethodNotAllowed,
    )
}


class HTTPError(APIError):
    """A non-2xx answer without HIL's JSON error body (HTML 500, obmd's empty bodies)."""

    type_name = "HTTPError"


def error_from_body(status: int, body: bytes) -> APIError:
    """Build the typed error a HIL response body describes (client rule of the API doc)."""
    import json

    try:
        doc = json.loads(body.decode("utf-8")) if body else None
    except (ValueError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("type"), str) and "msg" in doc:
        cls = API_ERRORS.get(doc["type"], APIError)
        err = cls(str(doc["msg"]), status=status)
        if cls is APIError:
            err.type_name = doc["type"]
        return err
    text = body[:300].decode("utf-8", "replace").strip()
    return HTTPError(f"HTTP {status}" + (f": {text}" if text else ""), status=status)


def is_auth_failure(err: APIError) -> bool:
    """HIL answers an unknown user with 404 'User x does not exist.'; treat it as 401."""
    if isinstance(err, AuthorizationError) and err.msg.startswith("Authentication failed"):
        return True
    return (
        err.type_name == "NotFoundError"
        and err.msg.startswith("User ")
        and err.msg.endswith("does not exist.")
    )
