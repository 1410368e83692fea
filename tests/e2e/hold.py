"""Many idle connections, held by a separate process so the test process keeps its fds:

    python -m tests.e2e.hold serve ADDRESS PORT            accept and hold everything
    python -m tests.e2e.hold open ADDRESS PORT COUNT       open COUNT connections, print "held N"

Both exit on SIGTERM (the lab stops them), or after LIFETIME seconds whatever happens.
"""

import os
import resource
import selectors
import socket
import sys
import threading
import time

LIFETIME = 300
OPEN_TIMEOUT = 30
BATCH = 500


def _raise_fd_limit():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _exit():
    os._exit(0)


def serve(address: str, port: int):
    """Accepts everything; closes a connection when its client does (an echo of the FIN)."""
    listener = socket.socket(socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((address, port))
    listener.listen(4096)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj is listener:
                conn, _ = listener.accept()
                selector.register(conn, selectors.EVENT_READ)
            elif not key.fileobj.recv(4096):
                selector.unregister(key.fileobj)
                key.fileobj.close()


def open_many(address: str, port: int, count: int):
    """In batches, so a listener's backlog is not flooded (dropped SYNs come back only after seconds)."""
    socks, established = [], 0
    while len(socks) < count:
        batch = []
        for _ in range(min(BATCH, count - len(socks))):
            sock = socket.socket(socket.AF_INET)
            sock.setblocking(False)
            sock.connect_ex((address, port))
            batch.append(sock)
        socks += batch
        established += _wait_established(batch)
    print(f"held {established}", flush=True)
    time.sleep(LIFETIME)


def _wait_established(batch) -> int:
    selector = selectors.DefaultSelector()
    for sock in batch:
        selector.register(sock, selectors.EVENT_WRITE)
    established, waiting, deadline = 0, len(batch), time.monotonic() + OPEN_TIMEOUT
    while waiting and time.monotonic() < deadline:
        for key, _ in selector.select(1):
            selector.unregister(key.fileobj)
            waiting -= 1
            established += key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    selector.close()
    return established


def main():
    _raise_fd_limit()
    threading.Timer(LIFETIME, _exit).start()
    command, address, port, *rest = sys.argv[1:]
    if command == "serve":
        serve(address, int(port))
    else:
        open_many(address, int(port), int(rest[0]))


if __name__ == "__main__":
    main()
