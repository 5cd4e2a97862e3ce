"""`flows.processes.Service.wait_healthy` against a real HTTP server that is slow to answer at first,
as a server starting on a busy machine is: a late answer is "not yet", never the end of the wait."""

from __future__ import annotations

import sys
import textwrap

import pytest

from flows.processes import Service, ServiceError, free_port

SLOW_AT_FIRST = textwrap.dedent(
    """
    import sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    seen = 0

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            global seen
            seen += 1
            if seen <= 2:
                time.sleep(1.5)  # past the caller's read timeout
            elif seen == 3:
                self.wfile.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 10\\r\\n\\r\\nhal")  # cut short
                self.close_connection = True
                return
            body = b"OK" if seen > 3 else b"starting"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
    """
)


def test_read_timeouts_and_broken_answers_are_not_yet(tmp_path):
    port = free_port()
    service = Service([sys.executable, "-c", SLOW_AT_FIRST, str(port)], tmp_path / "slow.log")
    try:
        service.wait_healthy(f"http://127.0.0.1:{port}/", lambda r: r.text == "OK", timeout=60, request_timeout=0.5)
    finally:
        service.stop()


def test_a_server_that_never_becomes_healthy_is_a_service_error(tmp_path):
    port = free_port()
    service = Service([sys.executable, "-c", SLOW_AT_FIRST, str(port)], tmp_path / "slow.log")
    with pytest.raises(ServiceError, match="did not answer"):
        service.wait_healthy(f"http://127.0.0.1:{port}/", lambda r: False, timeout=3, request_timeout=0.5)
