"""A DNS server for the rules tests: answers every A query with one address, over UDP and TCP,
from threads of this process, and records who asked over what."""

import socket
import threading

from relay.dns.framing import FrameError, Framer, frame
from relay.net.sockets import family_of
from tests.dnsresolve.servers import answer_for

POLL_SECONDS = 0.2  # how soon the threads see close()


class DnsResponder:
    def __init__(self, lab, host: str, address: str, port: int, answer: str):
        self.answer = answer
        self.queries: list[tuple[str, str]] = []  # (transport, client address)
        self._closed = threading.Event()
        family = family_of(address)
        self._udp = lab.socket(host, family, socket.SOCK_DGRAM)
        self._tcp = lab.socket(host, family)
        self._tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for sock in (self._udp, self._tcp):
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # [::] next to 0.0.0.0 or a v4 address
            sock.settimeout(POLL_SECONDS)
            sock.bind((address, port))
        self._tcp.listen(8)
        self._threads = [threading.Thread(target=serve, daemon=True) for serve in (self._serve_udp, self._serve_tcp)]
        for thread in self._threads:
            thread.start()

    def _serve_udp(self):
        while not self._closed.is_set():
            try:
                query, client = self._udp.recvfrom(65535)
            except TimeoutError:
                continue
            self.queries.append(("udp", client[0]))
            self._udp.sendto(answer_for(query, self.answer), client)

    def _serve_tcp(self):
        while not self._closed.is_set():
            try:
                connection, client = self._tcp.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(5)
                framer = Framer()
                try:
                    while data := connection.recv(4096):
                        for query in framer.receive_data(data):
                            self.queries.append(("tcp", client[0]))
                            connection.sendall(frame(answer_for(query, self.answer)))
                except (OSError, FrameError):
                    pass  # a client that left or sent garbage: the test's assertions say so

    def close(self):
        self._closed.set()
        for thread in self._threads:
            thread.join()
        self._udp.close()
        self._tcp.close()
