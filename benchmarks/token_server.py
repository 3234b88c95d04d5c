"""A minimal Brex token endpoint for the refresh benchmarks, run in a process of its own.

    python benchmarks/token_server.py        (prints the port it listens on, then serves)

It answers discovery and ``grant_type=refresh_token`` only: every refresh token is
accepted and a new access token and a rotated refresh token come back, with no id_token,
as fast as a threaded Python server on loopback can (HTTP/1.1 keep-alive). It keeps no
state, so the three loops of ``benchmarks/refresh.py`` can share the same connections.
"""

from __future__ import annotations

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # One packet per answer: without it the body waits for the client's delayed ACK.
    disable_nagle_algorithm = True

    def log_message(self, format, *args):
        pass

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self._headers_buffer.append(b"\r\n" + data)
        self.flush_headers()

    def do_GET(self):
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        if self.path == "/.well-known/openid-configuration":
            self._answer(200, {
                "issuer": base,
                "authorization_endpoint": base + "/oauth2/v1/authorize",
                "token_endpoint": base + "/oauth2/v1/token",
                "revocation_endpoint": base + "/oauth2/v1/revoke",
                "jwks_uri": base + "/oauth2/v1/keys",
                "userinfo_endpoint": base + "/oauth2/v1/userinfo",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
            })
        elif self.path == "/oauth2/v1/keys":
            self._answer(200, {"keys": []})
        else:
            self._answer(404, {"error": "not_found"})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode()
        if self.path != "/oauth2/v1/token" or "grant_type=refresh_token" not in body:
            self._answer(400, {"error": "unsupported_grant_type"})
            return
        self._answer(200, {
            "access_token": "at-" + os.urandom(24).hex(),
            "refresh_token": "rt-" + os.urandom(24).hex(),
            "token_type": "Bearer",
            "expires_in": 3600,
        })


def main() -> int:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
