"""The server in a thread on a free loopback port (tests and benchmarks)."""

from __future__ import annotations

import socket
import threading
import time


def serve_in_thread(app, timeout: float = 30.0):
    """Start uvicorn on 127.0.0.1:<free port>; returns (server, base URL).
    Stop it with `server.should_exit = True`."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"
