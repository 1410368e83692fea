"""--early-data auto: the probe that finds out whether an HTTP proxy keeps bytes sent right after a CONNECT
request (before its 2xx) for the tunnel, as squid and tinyproxy do, or drops them, as privoxy does.

It needs a destination that answers such bytes recognisably: the health target (--health-target), when it
is a TLS server. The probe asks the proxy for it with a ClientHello of the relay's own as early data (see
relay.proto.early_data); a TLS record after the 2xx means the proxy keeps early data, silence or a close
means it drops them. A proxy that cannot be asked (down, refusing the target) gets no verdict yet: it is
probed again, less and less often, up to every --health-interval. Until a verdict, no early data.
"""

import ssl

import trio

from relay import ends
from relay.addresses import format_address
from relay.logs import log
from relay.net.faults import UpstreamError
from relay.net.sockets import reset
from relay.net.tls import tunnel_stream
from relay.proto.early_data import tls_answer

ANSWER_TIMEOUT = 5.0  # seconds after the proxy's 2xx for the server's first bytes, at most
FIRST_RETRY = 1.0  # seconds before a probe without a verdict is tried again; doubled each time


def probe_client_hello(server_name: str | None = None) -> bytes:
    """A real TLS ClientHello (Python's ssl), for the probe; ``server_name`` as its SNI if it is a name."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


async def probe(dialer, state, config) -> bool | None:
    """Whether the proxy of ``state`` keeps early data: True, False, or None (it could not be asked).
    Raises UpstreamError "cancelled" when the relay is shutting down."""
    target = config.health_target
    try:
        sock, after = await dialer.open_async(
            state.upstream,
            state.addresses,
            target,
            mark=config.mark,
            connect_timeout=config.connect_timeout,
            handshake_timeout=config.handshake_timeout,
            early_data=probe_client_hello(target[0]),
        )
    except UpstreamError as exc:
        if exc.reason == ends.CANCELLED:
            raise
        log.debug("upstream %s: early data probe not answered: %s", state.upstream, exc)
        return None
    stream = tunnel_stream(sock)  # TLS inside for an https:// proxy
    try:
        answer = after
        deadline = trio.current_time() + min(config.handshake_timeout, ANSWER_TIMEOUT)
        while (verdict := tls_answer(answer)) is None:
            data = None
            with trio.move_on_at(deadline):
                data = await stream.receive_some(5)
            if not data:  # silent until the deadline, or closed: the server never got a ClientHello
                return False
            answer += data
    except trio.BrokenResourceError:
        return False  # reset: what a server does with a ClientHello cut short, never with a whole one
    finally:
        reset(sock)
    if not verdict:
        log.warning(
            "upstream %s: --health-target answered a TLS ClientHello with something else: it must be a TLS server "
            "for --early-data auto to find out whether the proxy keeps early data",
            state.upstream,
        )
        return None
    return True


async def find_out(dialer, states, config) -> None:
    """Probe one proxy until a verdict, through whichever of its ``states`` (its lanes: the ssh tunnels to it)
    is up, then keep the verdict on each (``keeps_early_data``) and say it, once."""
    delay = FIRST_RETRY
    while True:
        state = next((state for state in states if state.tunnel is None or state.tunnel.up), None)
        if state is not None:
            try:
                verdict = await probe(dialer, state, config)
            except UpstreamError:
                return  # shutting down
            if verdict is not None:
                for lane in states:
                    lane.keeps_early_data = verdict
                log.info(
                    "upstream %s %s early data sent after CONNECT (a ClientHello to %s): early data %s",
                    state.upstream,
                    "keeps" if verdict else "drops",
                    format_address(config.health_target),
                    "on" if verdict else "off",
                )
                return
        await trio.sleep(delay)
        delay = min(delay * 2, config.health_interval)
