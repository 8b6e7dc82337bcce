"""The live fleet page's server (python -m fleet_report serve): `/` (refreshes by itself), `/api/fleet`
(the fleet as JSON, from Prometheus at each request), `/healthz`. Runs until stopped (SIGTERM or Ctrl-C);
`make monitor-up` starts it beside Prometheus.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fleet_report.live import PrometheusApi, fleet_state
from fleet_report.page import page

log = logging.getLogger(__name__)
# The page's own inline script and style, its own API; nothing from elsewhere.
CSP = "default-src 'self'; script-src 'unsafe-inline' 'self'; style-src 'unsafe-inline'"


@dataclass(frozen=True)
class ServeConfig:
    prometheus: str
    host: str
    port: int
    refresh_s: float


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"--listen {text!r}: give HOST:PORT with a port 1-65535 (e.g. 127.0.0.1:8090)")
    return host.strip("[]") or "0.0.0.0", int(port_text)


def make_handler(config: ServeConfig) -> type[BaseHTTPRequestHandler]:
    api = PrometheusApi(config.prometheus)
    document = page(config.prometheus, config.refresh_s).encode()

    class Handler(BaseHTTPRequestHandler):
        server_version = "rover-fleet-page"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, "text/html; charset=utf-8", document)
            elif path == "/api/fleet":
                body = json.dumps(fleet_state(api).to_json(), allow_nan=False).encode()
                self._send(HTTPStatus.OK, "application/json", body)
            elif path == "/healthz":
                self._send(HTTPStatus.OK, "text/plain", b"ok\n")
            else:
                self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found\n")

        def _send(self, status: HTTPStatus, kind: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", CSP)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), format % args)

    return Handler


def serve(config: ServeConfig) -> None:
    server = ThreadingHTTPServer((config.host, config.port), make_handler(config))
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # serve_forever ends, the socket is closed
    log.info("fleet page on http://%s:%d/ (Prometheus %s)", config.host, config.port, config.prometheus)
    try:
        server.serve_forever()
    finally:
        server.server_close()
