"""Raw-byte request bodies for `rhaas serve` (the blob uploads of ``rhaas.kexec``).

HIL's calls carry small JSON bodies that :mod:`rhaas.adapters.hilserver` reads whole; a blob
upload is a kernel or an initrd, so its body is streamed instead: the caller is authenticated
from the headers first, then the bytes go from the socket through the hash into the blob
store (:meth:`rhaas.core.blobstore.BlobStore.receive`) in chunks. A request refused before
its body was read closes the connection, so no stray bytes are taken for the next request.
"""

from __future__ import annotations

from rhaas.errors import ValidationError


def receive(handler, route, args: dict, authenticate) -> tuple[int, dict]:
    """Handle a ``raw_body`` route on ``handler`` (a BaseHTTPRequestHandler); (status, JSON doc)."""
    handler.close_connection = True  # until the whole body has been read
    if handler.headers.get("Transfer-Encoding"):
        raise ValidationError("send the blob with a Content-Length, not a transfer encoding")
    length = (handler.headers.get("Content-Length") or "").strip()
    if not length.isdigit():
        raise ValidationError("a blob upload needs a Content-Length")
    if not all(args.values()):
        raise ValidationError("Request arguments are not valid for this request")
    caller = authenticate(handler.server.store.snapshot(), handler.headers.get("Authorization"))
    method = getattr(handler.server.service, route.name)
    result = method(caller, **args, stream=handler.rfile, length=int(length))
    handler.close_connection = False
    return 200, result
