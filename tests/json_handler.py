"""A quiet HTTP request handler that answers JSON: the base of the tests' fake APIs and proxies."""

import json
from http.server import BaseHTTPRequestHandler


class JsonHandler(BaseHTTPRequestHandler):
    def _send(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        """Answer `status` with `body` (bytes as they are, anything else as JSON) and extra `headers`."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass
