"""relay.checks: the verdicts of `relay check` on facts given here, and its command line."""

import socket

import dns.message
import dns.rcode
import pytest
import trio

from relay import check_command, checks
from relay.check_command import main, parse_target
from relay.checks import FAIL, OK, WARN
from relay.config import ConfigError
from relay.udp import datagram

LAN = ["lan0"]
JUMP = "-A PREROUTING -i lan0 -p tcp -m tcp ! --dport 53 -j RELAY"


def test_exit_status_is_1_only_for_a_failure():
    assert checks.exit_status([checks.Verdict(OK, "a", "b"), checks.Verdict(WARN, "c", "d")]) == 0
    assert checks.exit_status([checks.Verdict(OK, "a", "b"), checks.Verdict(FAIL, "c", "d")]) == 1
    assert checks.Verdict(WARN, "conntrack", "x").line() == "warn  conntrack: x"


def test_running():
    assert checks.running(12345, []).level == FAIL
    assert checks.running(12345, [(7, "/usr/bin/python3 -m relay --upstream x")]).level == OK
    stranger = checks.running(12345, [(8, "nc -l 12345")])
    assert stranger.level == FAIL and "pid 8 (nc -l 12345)" in stranger.detail


def test_metrics_find_the_relay_and_its_unhealthy_upstreams():
    text = (
        '# HELP relay_info x\nrelay_info{version="1.2",fast_path="cython"} 1\n'
        'relay_upstream_healthy{upstream="http://a:1"} 1\nrelay_upstream_healthy{upstream="socks5://u:***@b:2"} 0\n'
    )
    verdicts = checks.metrics("127.0.0.1:9100", text, None)
    assert [v.level for v in verdicts] == [OK, WARN]
    assert "relay 1.2" in verdicts[0].detail and verdicts[1].what == "upstream socks5://u:***@b:2"
    assert checks.metrics("x", None, "Connection refused")[0].level == FAIL
    assert checks.metrics("x", "hello", None)[0].level == FAIL


def test_rules_compared_line_by_line():
    expected = "table inet relay {\n\tchain a {\n\t\tredirect to :12345\n\t}\n}\n"
    assert checks.rules("nft", expected.replace("\t", "  "), expected).level == OK
    assert "not installed" in checks.rules("nft", None, expected).detail
    extra = checks.rules("nft", expected.replace("redirect", "accept\nredirect"), expected)
    assert extra.level == FAIL and "(extra: accept)" in extra.detail
    missing = checks.rules("nft", expected.replace("\t\tredirect to :12345\n", ""), expected)
    assert "(missing: redirect to :12345)" in missing.detail
    swapped = checks.rules("nft", "b\na\n", "a\nb\n")
    assert swapped.level == FAIL and "in another order" in swapped.detail


@pytest.mark.parametrize(
    "before,level",
    [
        ([], OK),
        (["-A PREROUTING -i lan0 -p tcp -j ACCEPT"], FAIL),
        (["-A PREROUTING -j ACCEPT"], FAIL),
        (["-A PREROUTING -i lan+ -j DNAT --to-destination 10.0.0.1"], FAIL),
        (["-A PREROUTING -d 10.1.0.0/16 -i lan0 -p tcp -j ACCEPT"], WARN),  # some of it
        (["-A PREROUTING -i wan0 -p tcp -j ACCEPT"], OK),  # another interface
        (["-A PREROUTING ! -i lan0 -j ACCEPT"], OK),
        (["-A PREROUTING -p udp -j ACCEPT"], OK),
        (["-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER"], OK),  # a user chain: it may come back
    ],
)
def test_iptables_shadowing(before, level):
    verdict = checks.iptables_shadowing("iptables", "nat", [*before, JUMP], "RELAY", LAN)
    assert verdict.level == level, verdict
    if level != OK:
        assert f"iptables -t nat -D {before[0].removeprefix('-A ')}" in verdict.detail


def test_iptables_shadowing_without_named_lan_interfaces_means_all_but_lo():
    assert (
        checks.iptables_shadowing("iptables", "nat", ["-A PREROUTING -i lo -j ACCEPT", JUMP], "RELAY", []).level == OK
    )
    assert (
        checks.iptables_shadowing("iptables", "nat", ["-A PREROUTING -i eth1 -j ACCEPT", JUMP], "RELAY", []).level
        == FAIL
    )
    assert "no jump to RELAY" in checks.iptables_shadowing("iptables", "nat", [], "RELAY", LAN).detail


RULESET = """table ip nat {
	chain PREROUTING {
		type nat hook prerouting priority dstnat; policy accept;
		iifname "lan0" tcp dport 8080 counter packets 0 bytes 0 dnat to 10.0.0.2
	}
}
table inet filter {
	chain early {
		type filter hook prerouting priority mangle - 10; policy accept;
		tcp dport 22 accept
	}
	chain input {
		type filter hook input priority filter; policy drop;
	}
}
table inet relay {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		iifname "lan0" meta l4proto tcp jump intercept
	}
	chain intercept {
		meta l4proto tcp redirect to :12345
	}
}
"""


def test_nft_base_chains_are_parsed_with_their_priorities():
    chains = {(c["table"], c["chain"]): c for c in checks.nft_base_chains(RULESET)}
    assert set(chains) == {("nat", "PREROUTING"), ("filter", "early"), ("filter", "input"), ("relay", "prerouting")}
    assert chains["filter", "early"]["priority"] == -160 and chains["filter", "input"]["policy"] == "drop"
    assert chains["nat", "PREROUTING"]["rules"] == [
        'iifname "lan0" tcp dport 8080 counter packets 0 bytes 0 dnat to 10.0.0.2'
    ]


def test_nft_shadowing_sees_what_takes_packets_before_us_but_not_accept():
    chains = checks.nft_base_chains(RULESET)
    verdict = checks.nft_shadowing(chains, ("inet", "relay"), "prerouting", -100)
    assert verdict.level == WARN and "table ip nat chain PREROUTING" in verdict.detail and "dnat" in verdict.detail
    # Only the accept at mangle - 10 is before a TPROXY chain at mangle: an accept does not stop ours.
    assert checks.nft_shadowing(chains, ("inet", "relay"), "prerouting", -150).level == OK
    dropping = checks.nft_base_chains(RULESET.replace("mangle - 10; policy accept", "raw; policy drop"))
    assert "policy drop" in checks.nft_shadowing(dropping, ("inet", "relay"), "prerouting", -150).detail


def test_forwarding():
    assert [v.level for v in checks.forwarding("1", "0", False)] == [OK]
    assert [v.level for v in checks.forwarding("1", "1", True)] == [OK, OK]
    off = checks.forwarding("0", "0", True)
    assert [v.level for v in off] == [FAIL, FAIL]
    assert "sysctl -w net.ipv4.ip_forward=1" in off[0].detail
    assert "net.ipv6.conf.all.forwarding=1" in off[1].detail


def test_ipv6_bypass():
    assert checks.ipv6_bypass({}, False).level == OK
    assert checks.ipv6_bypass({"lan0": ["2001:db8::1"]}, True).level == OK
    bypass = checks.ipv6_bypass({"lan0": ["2001:db8::1"]}, False)
    assert bypass.level == WARN and "2001:db8::1 on lan0" in bypass.detail


def test_quic():
    assert checks.quic("quic", [], True).level == OK and "rejected" in checks.quic("all", [], True).detail
    relayed = checks.quic("off", ["socks5://p:1080"], True)
    assert relayed.level == OK and "taken by the relay (--udp) through socks5://p:1080" in relayed.detail
    around = checks.quic("off", [], True)
    assert around.level == WARN and "--udp-reject quic" in around.detail
    missing = checks.quic("quic", [], False)
    assert missing.level == WARN and "relay's rules reject it (--udp-reject quic), but they are not" in missing.detail
    assert (
        "rules reject it (--udp-reject all), if they are in place (not checked)" in checks.quic("all", [], None).detail
    )


@pytest.mark.parametrize(
    "count,maximum,level", [(None, None, OK), (10, 1000, OK), (749, 1000, OK), (750, 1000, WARN), (950, 1000, FAIL)]
)
def test_conntrack(count, maximum, level):
    verdict = checks.conntrack(count, maximum)
    assert verdict.level == level
    if level != OK:
        assert "nf_conntrack_max=2000" in verdict.detail


def test_upstream_and_its_faults():
    assert "in 42 ms" in checks.upstream("http://p:3128", "a.example:443", 0.042, None, None).detail
    assert checks.upstream("http://p:3128", "a:443", None, "http-503", "target").level == WARN
    down = checks.upstream("http://p:3128", "a:443", None, "connect-econnrefused", "proxy")
    assert down.level == FAIL and "connect-econnrefused" in down.detail


def test_a_403_to_port_22_is_stock_squids_ssl_ports():
    refused = checks.non_tls_port("http://p:3128", "a.example:22", "http-403")
    # Port 22 is in neither Safe_ports nor SSL_ports: one line alone does not let it through.
    assert refused.level == WARN and "'acl Safe_ports port 22' and 'acl SSL_ports port 22'" in refused.detail
    high = checks.non_tls_port("http://p:3128", "a.example:8443", "http-403").detail
    assert "add 'acl SSL_ports port 8443' to squid.conf" in high and "Safe_ports" not in high.partition("add")[2]
    assert checks.non_tls_port("http://p:3128", "a.example:22", None).level == OK
    assert checks.non_tls_port("http://p:3128", "a.example:22", "http-503").level == OK  # tried: not the rules


def test_ssh_and_dns():
    assert checks.ssh_tunnel("-L x via far", 0.3, None).level == OK
    without = checks.ssh_tunnel("-L x via far", 0.3, "ssh exited with status 255", without_session=True)
    assert without.level == WARN and "without a session" in without.detail and "--ssh-session off" in without.detail
    failed = checks.ssh_tunnel("-L x via far", None, "ssh exited with status 255 (ssh said: Permission denied)")
    assert failed.level == FAIL and "Permission denied" in failed.detail
    assert checks.dns("127.0.0.1:53", "a.example", 0.01, "NOERROR", ["192.0.2.1"]).level == OK
    assert checks.dns("127.0.0.1:53", "a.example", 0.01, "NOERROR", []).level == WARN
    assert checks.dns("127.0.0.1:53", "a.example", 0.01, "SERVFAIL", []).level == FAIL
    assert checks.dns("127.0.0.1:53", "a.example", None, None, []).level == FAIL


def test_udp_upstream():
    dante = "socks5://p:1080"
    ok = checks.udp_upstream(dante, "192.0.2.53:53", ("2001:db8::1", 40000), 0.031, "NOERROR")
    assert ok.level == OK and "answered NOERROR in 31 ms (relay address [2001:db8::1]:40000)" in ok.detail
    refused = checks.udp_upstream(dante, "192.0.2.53:53", None, None, "socks5-not-allowed", refused=True)
    assert refused.level == FAIL and "the proxy refused UDP ASSOCIATE (socks5-not-allowed)" in refused.detail
    assert "udpassociate" in refused.detail
    down = checks.udp_upstream(dante, "192.0.2.53:53", None, None, "connect-econnrefused")
    assert down.level == FAIL and "no UDP ASSOCIATE (connect-econnrefused)" in down.detail
    assert "udpassociate" not in down.detail  # the proxy's rules are not what is wrong
    silent = checks.udp_upstream(dante, "192.0.2.53:53", ("192.0.2.1", 40000), None, None)
    assert silent.level == FAIL and "no answer from 192.0.2.53:53 came back: UDP to 192.0.2.1:40000" in silent.detail
    garbage = checks.udp_upstream(dante, "192.0.2.53:53", ("192.0.2.1", 40000), None, "a datagram that is not X")
    assert garbage.level == FAIL and "came back (got a datagram that is not X)" in garbage.detail


class FakeUdpRelay:
    """A proxy's UDP relay address on loopback: answers each datagram as ``reply`` says."""

    def __init__(self, family, address, reply):
        self.sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        self.address = address
        self.reply = reply
        self.received = 0

    async def run(self, task_status=trio.TASK_STATUS_IGNORED):
        with self.sock:
            await self.sock.bind((self.address, 0))
            task_status.started(self.sock.getsockname()[:2])
            while True:
                data, client = await self.sock.recvfrom(65535)
                self.received += 1
                for answer in self.reply(data):
                    await self.sock.sendto(answer, client)


def answered(data, rcode=dns.rcode.NOERROR, source=None):
    host, port, payload = datagram.decode(data)  # a request's header reads as a reply's
    response = dns.message.make_response(dns.message.from_wire(bytes(payload)))
    response.set_rcode(rcode)
    return datagram.encode(*(source or (host, port)), response.to_wire())


TARGET = ("192.0.2.53", 53)
CASES = {
    "answered": (lambda data: [answered(data)], "NOERROR"),
    "refused-rcode": (lambda data: [answered(data, dns.rcode.REFUSED)], "REFUSED"),  # UDP got through all the same
    "echo": (lambda data: [data], "a DNS message that does not answer the query"),
    "garbage": (lambda data: [b"\x00\x00\x00\x09junk"], "not a SOCKS5 UDP reply"),
    "not-dns": (lambda data: [datagram.encode(*TARGET, b"\x01")], "not a DNS answer"),
    "stranger": (lambda data: [answered(data, source=("192.0.2.99", 53))], "from 192.0.2.99:53, not from the server"),
    "garbage-then-answer": (lambda data: [b"\x00", answered(data)], "NOERROR"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("family,address", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
async def test_a_query_through_a_relay_address(monkeypatch, case, family, address):
    monkeypatch.setattr(check_command, "UDP_CHECK_TIMEOUT", 0.5)
    monkeypatch.setattr(check_command, "UDP_CHECK_RESEND", 0.1)
    reply, expected = CASES[case]
    relay = FakeUdpRelay(family, address, reply)
    async with trio.open_nursery() as nursery:
        relay_address = await nursery.start(relay.run)
        seconds, found = await check_command._query_relay_address(relay_address, TARGET, "a.example", None)
        nursery.cancel_scope.cancel()
    assert expected in found
    assert (seconds is not None) == (found in ("NOERROR", "REFUSED"))
    if seconds is None:
        assert 2 <= relay.received <= 6  # resent every 0.1 s for 0.5 s, then given up


async def test_a_closed_relay_port_is_said(monkeypatch):
    monkeypatch.setattr(check_command, "UDP_CHECK_TIMEOUT", 0.5)
    monkeypatch.setattr(check_command, "UDP_CHECK_RESEND", 0.1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
        closed.bind(("127.0.0.1", 0))
        relay_address = closed.getsockname()
    seconds, found = await check_command._query_relay_address(relay_address, TARGET, "a.example", None)
    assert seconds is None and found == "a port unreachable from the relay address"


def test_check_target():
    assert parse_target("cdn.example:443") == ("cdn.example", 443)
    assert parse_target("[2001:db8::1]:8443") == ("2001:db8::1", 8443)
    for bad in ("cdn.example", ":443", "a:0", "a:http"):
        with pytest.raises(ConfigError):
            parse_target(bad)


def test_bad_options_are_status_2_without_the_password(capsys):
    assert main(["--upstream", "http://u:Secret-42@p:3128", "--check-target", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert err == "relay check: error: --check-target 'nowhere': expected HOST:PORT\n"
    assert main(["--upstream", "http://u:Secret-42@p:3128", "--check-udp-target", "dns.example:53"]) == 2
    assert "--check-udp-target dns.example:53: give an IP address" in capsys.readouterr().err
    assert main(["--upstream", "http://p:3128", "--check-udp-target", "1.1.1.1"]) == 2
    assert "--check-udp-target '1.1.1.1': expected HOST:PORT" in capsys.readouterr().err
    assert main(["--upstream", "http://p:3128", "--check-name", "a..example"]) == 2
    assert "--check-name 'a..example': not a DNS name" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["--upstream", "http://u:Secret-42@p:3128", "--no-such-option"])
    assert exited.value.code == 2 and "Secret-42" not in capsys.readouterr().err


def test_tproxy_routing():
    assert checks.tproxy_routing([]).level == OK
    missing = checks.tproxy_routing(["ip -4 rule add fwmark 0x100/0x100 lookup 100"])
    assert missing.level == FAIL and "ip -4 rule add fwmark 0x100/0x100 lookup 100" in missing.detail
