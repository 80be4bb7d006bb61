"""A real HTTP MJPEG camera for tests (multipart/x-mixed-replace JPEG, what IP cameras serve).

Shared by the capture tests and the reliability suite (on the pytest ``pythonpath``; test modules cannot import
each other under ``--import-mode=importlib``).
"""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class MjpegServer:
    """Serves ``jpegs`` in a loop at ``fps`` to every client.

    Silence (a camera whose encoder hung; the socket stays open): a connection stops sending once it has sent
    ``silent_after`` frames, if ``silent_after`` is set and the connection's number (0, 1, ... in order of GET) is in
    ``silent_connections`` (None: every connection); ``silent_all`` silences every connection at once.
    ``requests`` holds the monotonic time of every GET; ``silent_since`` when silence first began."""

    def __init__(self, jpegs: list[bytes], fps: float = 25.0, port: int = 0) -> None:
        self.jpegs, self.fps, self.port = jpegs, fps, port
        self.silent_after: int | None = None
        self.silent_connections: set[int] | None = None
        self.silent_all = False
        self.requests: list[float] = []
        self.silent_since: float | None = None
        self._closing = threading.Event()
        self._clients: list[socket.socket] = []
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/video.mjpg"

    def _silent(self, connection: int, sent: int) -> bool:
        if self.silent_all:
            return True
        if self.silent_after is None or sent < self.silent_after:
            return False
        return self.silent_connections is None or connection in self.silent_connections

    def start(self) -> MjpegServer:
        server = self
        self._closing.clear()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                number = len(server.requests)
                server.requests.append(time.monotonic())
                server._clients.append(self.connection)
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                self.wfile.flush()
                sent = 0
                try:
                    while not server._closing.is_set():
                        if server._silent(number, sent):
                            if server.silent_since is None:
                                server.silent_since = time.monotonic()
                            server._closing.wait(0.05)
                            continue
                        jpeg = server.jpegs[sent % len(server.jpegs)]
                        head = f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
                        self.wfile.write(head.encode() + jpeg + b"\r\n")
                        self.wfile.flush()
                        sent += 1
                        server._closing.wait(1.0 / server.fps)
                except OSError:
                    pass  # the client went away

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, name="mjpeg-server", daemon=True).start()
        return self

    def kill(self) -> None:
        """Drop every connection and stop listening, as a camera losing power would."""
        self._closing.set()
        if self._httpd is None:
            return
        self._httpd.shutdown()
        for client in self._clients:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            client.close()
        self._clients.clear()
        self._httpd.server_close()
        self._httpd = None
