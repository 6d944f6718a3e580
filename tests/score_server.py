"""A real HTTP reward server on 127.0.0.1 for the remote-reward tests (actors/rewards/remote.py)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ScoreServer:
    """Scores = completion lengths; answers the first `fail_first` requests with HTTP 500."""

    def __init__(self, fail_first: int = 0, delay_s: float = 0.0) -> None:
        self.requests: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.fail_first, self.delay_s = fail_first, delay_s
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                outer.headers.append(dict(self.headers))
                if len(outer.requests) <= outer.fail_first:
                    self.send_response(500)
                    self.end_headers()
                    return
                if outer.delay_s:
                    threading.Event().wait(outer.delay_s)
                scores = [None if r is None else float(len(c)) for c, r in zip(body["completions"], body["references"])]
                data = json.dumps({"scores": scores}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
