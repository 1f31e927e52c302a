"""Raw-byte request bodies for `rhaas serve`: the blob-upload parts of ``rhaas.kexec``.

HIL's calls carry small JSON bodies that :mod:`rhaas.adapters.hilserver` parses whole; a blob
(a kernel or an initrd) goes up in parts of at most :data:`rhaas.protocol.BLOB_PART` bytes, each
one request whose body waitress has already taken within its limits. This module checks the
part's framing and the caller, then hands the body to the service as a stream: the bytes go
through the hash into the caller's partial file in chunks, never into memory whole.
"""

from __future__ import annotations

from rhaas import protocol
from rhaas.errors import ValidationError


def receive(environ, route, args: dict, app) -> tuple[int, dict]:
    """Handle a ``raw_body`` route (WSGI ``environ``) for the HILApp ``app``; (status, JSON doc)."""
    from rhaas.adapters.hilserver import authenticate

    length = (environ.get("CONTENT_LENGTH") or "").strip()
    if not length.isdigit():
        raise ValidationError("a blob part needs a Content-Length")
    if int(length) > protocol.BLOB_PART:
        raise ValidationError(f"a blob part holds at most {protocol.BLOB_PART} bytes", status=413)
    if not all(args.values()):
        raise ValidationError("Request arguments are not valid for this request")
    caller = authenticate(app.store.snapshot(), environ.get("HTTP_AUTHORIZATION"), environ.get("REMOTE_ADDR"),
                          app.throttle)
    method = getattr(app.service, route.name)
    return 200, method(caller, **args, stream=environ["wsgi.input"], length=int(length))
