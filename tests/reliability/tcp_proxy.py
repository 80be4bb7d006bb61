"""A small TCP proxy for partition tests: one thread, ``select`` over every socket, three modes.

- ``forward``: bytes flow both ways (new connections are connected upstream at accept time).
- ``down``: every open connection is closed on both sides and new ones are accepted and closed at once
  (what a client sees when a link goes away and the far end is unreachable but the local stack answers).
- ``blackhole``: connections stay open but nothing is read or forwarded in either direction, new connections are
  accepted and held the same way (a partition where no FIN/RST ever arrives: only keepalive can notice).

Going back to ``forward`` after ``blackhole`` resumes the held connections with whatever the kernel buffered;
a side that gave up in the meantime is seen as EOF and its partner is closed.

Loaded by ``tests/reliability/conftest.py`` (fixture ``tcp_proxy``); the soak script may import it by path too.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from typing import Literal

Mode = Literal["forward", "down", "blackhole"]
_CHUNK = 65536


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(16)
        self._listener.setblocking(False)
        self.host, self.port = host, int(self._listener.getsockname()[1])
        self._mode: Mode = "forward"
        self._lock = threading.Lock()
        self._peer: dict[socket.socket, socket.socket] = {}  # both directions of every pair
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self.accepted = 0
        self.mode_changes: list[tuple[float, Mode]] = []
        self._thread = threading.Thread(target=self._run, name=f"tcp-proxy-{self.port}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ control (any thread)

    @property
    def mode(self) -> Mode:
        return self._mode

    def set_mode(self, mode: Mode) -> float:
        """Switch mode; returns the monotonic time the switch took effect (open pairs closed for ``down``)."""
        with self._lock:
            self._mode = mode
            if mode == "down":
                for sock in list(self._peer):
                    self._close_pair_locked(sock)
            at = time.monotonic()
            self.mode_changes.append((at, mode))
        self._wake_w.send(b"x")
        return at

    def connections(self) -> int:
        with self._lock:
            return len(self._peer) // 2

    def close(self) -> None:
        self._stop.set()
        self._wake_w.send(b"x")
        self._thread.join(5)
        with self._lock:
            for sock in list(self._peer):
                self._close_pair_locked(sock)
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()

    # ------------------------------------------------------------------ the thread

    def _close_pair_locked(self, sock: socket.socket) -> None:
        peer = self._peer.pop(sock, None)
        if peer is not None:
            self._peer.pop(peer, None)
        for s in (sock, peer):
            if s is None:
                continue
            try:
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, OSError):
            return
        self.accepted += 1
        if self._mode == "down":
            client.close()
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=2.0)
        except OSError:
            client.close()
            return
        for s in (client, upstream):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._peer[client] = upstream
            self._peer[upstream] = client

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                readable = [self._listener, self._wake_r]
                if self._mode == "forward":
                    readable += list(self._peer)
            try:
                ready, _, _ = select.select(readable, [], [], 0.2)
            except (OSError, ValueError):  # a socket closed under us by set_mode("down")
                continue
            for sock in ready:
                if sock is self._wake_r:
                    self._wake_r.recv(4096)
                elif sock is self._listener:
                    self._accept()
                else:
                    self._pump(sock)

    def _pump(self, sock: socket.socket) -> None:
        with self._lock:
            if self._mode != "forward" or sock not in self._peer:
                return
            peer = self._peer[sock]
            try:
                data = sock.recv(_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._close_pair_locked(sock)
                return
            try:
                peer.setblocking(True)
                peer.settimeout(2.0)
                peer.sendall(data)
                peer.setblocking(False)
            except OSError:
                self._close_pair_locked(sock)
