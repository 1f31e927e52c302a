"""The HIL client copes with real HIL's quirks that `rhaas serve` itself never shows.

A small HIL-shaped server on loopback answers the way real HIL and obmd do (text/html labels
on JSON, HTML 500 pages, 307 redirects to a token URL, obmd's empty-bodied errors). This is a
stand-in because real HIL runs only on Python 2.7 and cannot be hosted here.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rhaas.adapters.hil import HILClient, decode_metadata
from rhaas.errors import HTTPError, OBMError

SEEN: list[dict] = []


class FakeHIL(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _send(self, status, body=b"", ctype="text/html; charset=utf-8", headers=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        SEEN.append({"method": self.command, "path": self.path, "body": body,
                     "auth": self.headers.get("Authorization"), "ctype": self.headers.get("Content-Type")})
        port = self.server.server_address[1]
        if self.path == "/v0/node/n1":
            doc = {"metadata": {"rhaas.ssh": '"root@10.0.0.15:22"', "n": "42", "raw": "not json"},
                   "name": "n1", "nics": [], "project": "p"}
            return self._send(200, json.dumps(doc).encode())  # JSON labelled text/html, as HIL does
        if self.path == "/v0/node/n1/power_cycle":
            loc = f"http://127.0.0.1:{port}/obmd/node/n1/power_cycle?token=0123456789abcdef"
            return self._send(307, b"<html>redirect</html>", headers=[("Location", loc)])
        if self.path.startswith("/obmd/node/n1/power_cycle"):
            return self._send(200 if json.loads(body) == {"force": True} else 400)
        if self.path == "/v0/node/n1/power_status":
            return self._send(307, b"", headers=[("Location", f"http://127.0.0.1:{port}/obmd/node/n1/power_status?token=dead")])
        if self.path.startswith("/obmd/node/n1/power_status"):
            return self._send(401)  # stale token: obmd answers with no body
        if self.path == "/v0/node/n1/obm":
            return self._send(200)
        if self.path == "/v0/network/x":
            return self._send(500, b"<html><body>Internal Server Error</body></html>")
        return self._send(404, b"<html>not found</html>")

    do_GET = do_POST = do_PUT = do_DELETE = _handle


@pytest.fixture
def fake():
    SEEN.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHIL)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield HILClient(f"http://127.0.0.1:{server.server_address[1]}", "alice", "s3cret", timeout=5)
    server.shutdown()
    server.server_close()


def test_json_with_html_content_type_and_double_encoded_metadata(fake):
    doc = fake.show_node("n1")
    assert doc["metadata"] == {"rhaas.ssh": "root@10.0.0.15:22", "n": 42, "raw": "not json"}
    assert SEEN[-1]["auth"].startswith("Basic ")  # sent up front, no challenge needed
    assert SEEN[-1]["body"] == b"" and SEEN[-1]["ctype"] is None  # a GET carries no body


def test_307_is_followed_with_same_method_and_body_without_credentials(fake):
    assert fake.power("n1", "cycle") is None
    first, second = SEEN[-2], SEEN[-1]
    assert first["path"] == "/v0/node/n1/power_cycle" and first["auth"]
    assert second["method"] == "POST" and second["path"].startswith("/obmd/node/n1/power_cycle?token=")
    assert json.loads(second["body"]) == {"force": True} and second["auth"] is None


def test_obmd_empty_error_becomes_obm_error(fake):
    with pytest.raises(OBMError) as err:
        fake.power("n1", "status")
    assert err.value.status == 401 and "token" not in str(err.value)  # the Location is never shown


def test_html_500_becomes_http_error(fake):
    with pytest.raises(HTTPError) as err:
        fake.call("show_network", network="x")
    assert err.value.status == 500 and "Internal Server Error" in str(err.value)


def test_obm_on_old_hil_is_not_supported_quietly(fake):
    fake.set_obm("n1", True)  # 200 empty
    fake.set_obm("n2", True)  # HTML 404: an old HIL without /obm; treated as "no OBM switch"


def test_decode_metadata_keeps_raw_strings():
    assert decode_metadata({"a": '"x"', "b": "{bad"}) == {"a": "x", "b": "{bad"}
