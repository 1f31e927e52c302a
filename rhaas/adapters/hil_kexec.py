"""The client side of `rhaas serve`'s own extensions to HIL's API (``rhaas.kexec``: blobs and
batch kexec actions), mixed into :class:`rhaas.adapters.hil.HILClient`.

Every call goes through the client's bounded transport (one deadline a call, a size cap an
answer); a blob goes up in parts of at most :data:`rhaas.protocol.BLOB_PART` bytes, each one
call, then a commit the server checks against the blob's sha256.
"""

from __future__ import annotations

import json
import os
import time

from rhaas import protocol
from rhaas.errors import APIError, HTTPError, UsageError, error_from_body


class KexecCalls:
    # -- the rhaas.kexec extension (only another `rhaas serve` offers it) --------------------------
    def active_extensions(self) -> list[str]:
        doc = self.call("list_active_extensions")
        return [e for e in doc if isinstance(e, str)] if isinstance(doc, list) else []

    def blob_held(self, sha256: str) -> bool:
        try:
            self.call("rhaas_blob_show", sha256=sha256)
        except APIError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def blob_upload(self, sha256: str, path: str) -> int:
        """Upload a local file as blob ``sha256``, part by part (protocol.BLOB_PART bytes each,
        every part one call within the call deadline), then commit it; returns its size."""
        size = os.path.getsize(path)
        offset = 0
        with open(path, "rb") as fh:
            while offset < size:
                part = fh.read(protocol.BLOB_PART)
                if not part:
                    raise UsageError(f"{path} shrank while it was being uploaded")
                self.call_raw("rhaas_blob_part", part, sha256=sha256, offset=str(offset))
                offset += len(part)
        self.call("rhaas_blob_commit", {"size": size}, sha256=sha256)
        return size

    def call_raw(self, name: str, data: bytes, **path_args):
        """One call of a ``raw_body`` route: ``data`` as an octet-stream body, one deadline."""
        route = protocol.BY_NAME[name]
        path = route.url_path(**path_args)
        deadline = time.monotonic() + self.timeout
        what = f"{route.method} {path}"
        status, _, answer = self._request(route.method, path, data, deadline, self.max_doc_bytes, what,
                                          content_type="application/octet-stream")
        if not 200 <= status < 300:
            raise error_from_body(status, answer)
        return json.loads(answer) if answer.strip() else None

    def kexec_start(self, nodes: list[str], kernel: str, initrd: str, append: str, ssh_keys: list[str],
                    timeout: float | None = None, fallback: bool = True, blob_url: str | None = None) -> str:
        body: dict = {"nodes": list(nodes), "kernel": kernel, "initrd": initrd, "append": append,
                      "ssh_keys": list(ssh_keys), "fallback": bool(fallback)}
        if timeout is not None:
            body["timeout"] = float(timeout)
        if blob_url:
            body["blob_url"] = blob_url
        doc = self.call("rhaas_kexec", body)
        action = doc.get("action_id") if isinstance(doc, dict) else None
        if not isinstance(action, str) or not protocol.valid_name(action):
            raise HTTPError("upstream answered a kexec without a valid action_id", status=502)
        return action

    def kexec_status(self, action_id: str) -> dict:
        doc = self.call("rhaas_kexec_status", action_id=action_id)
        if not isinstance(doc, dict) or doc.get("status") not in ("PENDING", "DONE", "ERROR"):
            raise HTTPError("upstream answered a kexec status that is not one", status=502)
        return doc
