"""relay.rules without touching the host: the generated text, and what apply() would run."""

import ipaddress
import os
import re
import subprocess

import pytest

from relay import rules
from relay.config import Config
from relay.rules import RulesError, RuleSettings, describe, iptables_restore, nft_script, route_commands
from relay.rules_command import settings_for

EXEMPT = ("198.51.100.7", "2001:db8::/32", "203.0.113.0/24")
# Each kind of target in each family: REDIRECT (wildcard), DNAT to an address, DNAT to 127.0.0.1.
DNS_SERVICES = {
    "": (),
    "-dns": (("0.0.0.0", 5353), ("fd00::53", 5353)),
    "-dns-lo": (("127.0.0.1", 5353), ("::", 5354)),
}
FAKE_IP_RANGES = ("198.18.0.0/15", "fc00::/18")
ALL_SETTINGS = [
    RuleSettings(mode, 12345, ifaces, 0x1, EXEMPT, redirect_output=output, ipv6=ipv6, dns=dns, fake_ip_ranges=fake)
    for mode in rules.MODES
    for ifaces in ((), ("lan0", "wlan0"))
    for output in (False, True)
    for ipv6 in (True, False)
    for dns in DNS_SERVICES.values()
    for fake in ((), FAKE_IP_RANGES)
]


def settings_id(settings):
    dns = next(name for name, services in DNS_SERVICES.items() if services == settings.dns)
    return (
        f"{settings.mode}-{'+'.join(settings.lan_ifaces) or 'all'}"
        f"{'-output' if settings.redirect_output else ''}{'' if settings.ipv6 else '-v4only'}{dns}"
        f"{'-fake-ip' if settings.fake_ip_ranges else ''}"
    )


def host_of(endpoint):
    """The address of "192.0.2.1:53" or "[2001:db8::1]:53"."""
    return endpoint.rpartition(":")[0].strip("[]")


def chain_rules(text, chain):
    return [line for line in text.splitlines() if line.startswith(f"-A {chain} ")]


def nft_chain(script, name):
    body = script.split(f"chain {name} {{", 1)[1].split("}\n", 1)[0]
    return [line.strip() for line in body.splitlines() if line.strip()]


def test_redirect_chain_exempts_in_order_then_redirects():
    settings = RuleSettings("redirect", 12345, ("lan0",), 0x1, ("198.51.100.7", "10.1.2.0/24"))
    assert chain_rules(iptables_restore(settings, 4), "RELAY") == [
        "-A RELAY -m mark --mark 0x1/0x1 -j RETURN",
        "-A RELAY -p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -j RETURN",
        "-A RELAY -d 127.0.0.0/8 -j RETURN",
        "-A RELAY -m addrtype --dst-type LOCAL -j RETURN",
        *(f"-A RELAY -d {network} -j RETURN" for network in rules.PRIVATE_AND_RESERVED[4]),
        "-A RELAY -d 198.51.100.7/32 -j RETURN",
        "-A RELAY -d 10.1.2.0/24 -j RETURN",
        "-A RELAY -p tcp -j REDIRECT --to-ports 12345",
    ]


def test_tproxy_chain_skips_held_connections_then_tproxies_with_its_own_mark():
    text = iptables_restore(RuleSettings("tproxy", 4000, ("lan0",), 0x4, tproxy_mark=0x200), 6)
    chain = chain_rules(text, "RELAY")
    assert chain[:4] == [
        "-A RELAY -m mark --mark 0x4/0x4 -j RETURN",
        "-A RELAY -p tcp -m socket --transparent -j MARK --set-xmark 0x200/0x200",
        "-A RELAY -p tcp -m socket --transparent -j ACCEPT",
        # a connection under way around the relay is left alone: only opening SYNs are taken
        "-A RELAY -p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -j RETURN",
    ]
    assert chain[4] == "-A RELAY -d ::1/128 -j RETURN"
    assert chain[-1] == "-A RELAY -p tcp -j TPROXY --on-port 4000 --tproxy-mark 0x200/0x200"
    assert text.startswith("*mangle\n") and "*nat" not in text


def test_the_mark_is_matched_under_its_own_mask():
    settings = RuleSettings("redirect", 12345, (), 0x30, redirect_output=True)
    assert "-m mark --mark 0x30/0x30 -j RETURN" in iptables_restore(settings, 4)
    assert nft_chain(nft_script(settings), "intercept")[0] == "meta mark & 0x30 == 0x30 return"


@pytest.mark.parametrize("settings", ALL_SETTINGS, ids=settings_id)
def test_each_family_gets_only_its_own_addresses(settings):
    for version in (4, 6):
        text = iptables_restore(settings, version)
        destinations = re.findall(r"-d (\S+)", text) + list(map(host_of, re.findall(r"--to-destination (\S+)", text)))
        assert destinations and all(ipaddress.ip_network(d).version == version for d in destinations)
    script = nft_script(settings)
    for keyword, version in (("ip", 4), ("ip6", 6)):
        for match in re.findall(rf"\b{keyword} daddr (\{{[^}}]*\}}|\S+)", script):
            networks = match.strip("{} ").split(", ")
            assert all(ipaddress.ip_network(n).version == version for n in networks), match
        for endpoint in re.findall(rf"dnat {keyword} to (\S+)", script):
            assert ipaddress.ip_address(host_of(endpoint)).version == version
    if not settings.ipv6:
        assert "ip6 " not in script


@pytest.mark.parametrize("settings", ALL_SETTINGS, ids=settings_id)
def test_ports_and_jumps(settings):
    text = iptables_restore(settings, 4)
    script = nft_script(settings)
    jumps = [line for line in text.splitlines() if line.startswith("-A PREROUTING")]
    expected_inputs = [f"-i {iface} " for iface in settings.lan_ifaces] or ["! -i lo "]
    assert [any(i in jump for jump in jumps) for i in expected_inputs] == [True] * len(expected_inputs)
    lan_jump = nft_chain(script, "prerouting")[1]
    if settings.lan_ifaces:
        assert lan_jump.startswith('iifname { "lan0", "wlan0" } ')
    else:
        assert lan_jump.startswith('iifname != "lo" ')
    assert ("meta nfproto ipv4" in lan_jump) == (not settings.ipv6)
    if settings.mode == "redirect":
        assert "--to-ports 12345" in text and "redirect to :12345" in script
        assert ("-A OUTPUT -p tcp -j RELAY" in text) == settings.redirect_output
        assert ("type nat hook output" in script) == settings.redirect_output
    else:
        assert "--on-port 12345" in text and "tproxy ip to :12345" in script
        assert ("-A OUTPUT -p tcp -j RELAY_OUTPUT" in text) == settings.redirect_output
        assert ("-A PREROUTING -i lo -p tcp -m mark --mark 0x100/0x100 -j RELAY" in text) == settings.redirect_output
        assert ("type route hook output" in script) == settings.redirect_output


def test_tproxy_of_the_routers_own_traffic_marks_only_what_it_sends_itself():
    settings = RuleSettings("tproxy", 12345, ("lan0",), 0x1, ("198.51.100.7",), redirect_output=True)
    text = iptables_restore(settings, 4)
    assert chain_rules(text, "RELAY_OUTPUT") == [
        "-A RELAY_OUTPUT -m mark --mark 0x1/0x1 -j RETURN",
        "-A RELAY_OUTPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack --ctstate NEW -j RELAY_OUTPUT_NEW",
        "-A RELAY_OUTPUT -m connmark --mark 0x100/0x100 -j MARK --set-xmark 0x100/0x100",
    ]
    judged = chain_rules(text, "RELAY_OUTPUT_NEW")
    assert judged[0] == "-A RELAY_OUTPUT_NEW -m addrtype ! --src-type LOCAL -j RETURN"
    assert judged[-2:] == [
        "-A RELAY_OUTPUT_NEW -d 198.51.100.7/32 -j RETURN",
        "-A RELAY_OUTPUT_NEW -j CONNMARK --set-xmark 0x100/0x100",
    ]
    script = nft_script(settings)
    assert nft_chain(script, "mark_output") == [
        "meta mark & 0x1 == 0x1 return",
        "tcp flags & (fin | syn | rst | ack) == syn ct state new jump take_output",
        "ct mark & 0x100 == 0x100 meta mark set meta mark | 0x100",
    ]
    take_output = nft_chain(script, "take_output")
    assert take_output[0] == "fib saddr type != local return"
    assert take_output[-1] == "ct mark set ct mark | 0x100"


def test_private_ranges_can_be_left_to_interception():
    settings = RuleSettings("redirect", 12345, (), 0x1, ("10.77.3.2",), exempt_private=False)
    assert chain_rules(iptables_restore(settings, 4), "RELAY")[4:] == [
        "-A RELAY -d 10.77.3.2/32 -j RETURN",
        "-A RELAY -p tcp -j REDIRECT --to-ports 12345",
    ]
    assert "10.0.0.0/8" not in nft_script(settings) and "fc00::/7" not in iptables_restore(settings, 6)


def test_tcp_to_the_fake_ranges_is_redirected_before_any_exemption():
    """198.18.0.0/15 and fc00::/18 are reserved ranges (fc00::/7 is exempt), and a --bypass may cover them too."""
    settings = RuleSettings("redirect", 12345, ("lan0",), 0x1, ("198.18.0.0/16",), fake_ip_ranges=FAKE_IP_RANGES)
    assert chain_rules(iptables_restore(settings, 4), "RELAY")[:4] == [
        "-A RELAY -m mark --mark 0x1/0x1 -j RETURN",
        "-A RELAY -p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -j RETURN",
        "-A RELAY -d 198.18.0.0/15 -p tcp -j REDIRECT --to-ports 12345",
        "-A RELAY -d 127.0.0.0/8 -j RETURN",
    ]
    assert chain_rules(iptables_restore(settings, 6), "RELAY")[2] == (
        "-A RELAY -d fc00::/18 -p tcp -j REDIRECT --to-ports 12345"
    )
    assert nft_chain(nft_script(settings), "intercept")[2:4] == [
        "ip daddr { 198.18.0.0/15 } meta l4proto tcp redirect to :12345",
        "ip6 daddr { fc00::/18 } meta l4proto tcp redirect to :12345",
    ]


def test_tcp_to_the_fake_ranges_is_tproxied_after_the_connections_the_relay_holds():
    settings = RuleSettings("tproxy", 4000, (), 0x4, redirect_output=True, fake_ip_ranges=FAKE_IP_RANGES)
    text = iptables_restore(settings, 4)
    assert chain_rules(text, "RELAY")[4] == (
        "-A RELAY -d 198.18.0.0/15 -p tcp -j TPROXY --on-port 4000 --tproxy-mark 0x100/0x100"
    )
    assert (
        chain_rules(text, "RELAY_OUTPUT_NEW")[1]
        == "-A RELAY_OUTPUT_NEW -d 198.18.0.0/15 -p tcp -j CONNMARK --set-xmark 0x100/0x100"
    )
    script = nft_script(settings)
    assert nft_chain(script, "intercept")[3:5] == [
        "ip daddr { 198.18.0.0/15 } meta l4proto tcp tproxy ip to :4000 meta mark set meta mark | 0x100 accept",
        "ip6 daddr { fc00::/18 } meta l4proto tcp tproxy ip6 to :4000 meta mark set meta mark | 0x100 accept",
    ]
    assert nft_chain(script, "take_output")[1] == (
        "ip daddr { 198.18.0.0/15 } meta l4proto tcp ct mark set ct mark | 0x100 return"
    )


@pytest.mark.parametrize("output", [False, True])
def test_udp_to_the_fake_ranges_is_rejected(output):
    settings = RuleSettings(
        "redirect", 12345, ("lan0", "wlan0"), 0x1, redirect_output=output, fake_ip_ranges=FAKE_IP_RANGES
    )
    for version, network in ((4, "198.18.0.0/15"), (6, "fc00::/18")):
        text = iptables_restore(settings, version)
        filter_table = text.split("*filter\n", 1)[1]
        assert filter_table.splitlines() == [
            ":RELAY_UDP - [0:0]",
            f"-A RELAY_UDP -d {network} -j REJECT",
            "-A FORWARD -i lan0 -p udp -j RELAY_UDP",
            "-A FORWARD -i wlan0 -p udp -j RELAY_UDP",
            *(["-A OUTPUT -p udp -j RELAY_UDP"] if output else []),
            "COMMIT",
        ]
    script = nft_script(settings)
    assert nft_chain(script, "udp_reject") == [
        "type filter hook forward priority filter; policy accept;",
        'iifname { "lan0", "wlan0" } meta l4proto udp jump reject_udp',
    ]
    assert nft_chain(script, "reject_udp") == ["ip daddr { 198.18.0.0/15 } reject", "ip6 daddr { fc00::/18 } reject"]
    assert ("chain udp_reject_output" in script) == output


@pytest.mark.parametrize("policy,last", [("quic", "-p udp --dport 443 -j REJECT"), ("all", "-p udp -j REJECT")])
def test_the_lans_quic_or_all_its_udp_is_rejected_past_the_tcp_captures_exemptions(policy, last):
    settings = RuleSettings("redirect", 12345, ("lan0",), 0x1, ("198.51.100.7",), udp_reject=policy)
    assert chain_rules(iptables_restore(settings, 4), "RELAY_UDP") == [
        "-A RELAY_UDP -m mark --mark 0x1/0x1 -j RETURN",
        "-A RELAY_UDP -d 127.0.0.0/8 -j RETURN",
        "-A RELAY_UDP -m addrtype --dst-type LOCAL -j RETURN",
        *(f"-A RELAY_UDP -d {network} -j RETURN" for network in rules.PRIVATE_AND_RESERVED[4]),
        "-A RELAY_UDP -d 198.51.100.7/32 -j RETURN",
        f"-A RELAY_UDP {last}",
    ]
    assert "-A FORWARD -i lan0 -p udp -j RELAY_UDP" in iptables_restore(settings, 6)
    reject = nft_chain(nft_script(settings), "reject_udp")
    assert reject[0] == "meta mark & 0x1 == 0x1 return" and reject[-1] == (
        "udp dport 443 reject" if policy == "quic" else "reject"
    )
    assert any("198.51.100.7" in rule and rule.endswith(" return") for rule in reject)


def test_udp_left_alone_makes_no_filter_chain_and_a_bad_policy_one_line():
    settings = RuleSettings("redirect", 12345, ("lan0",), 0x1, udp_reject="off")
    assert "*filter" not in iptables_restore(settings, 4) and "reject" not in nft_script(settings)
    with pytest.raises(RulesError, match="unknown UDP policy 'some'"):
        RuleSettings("redirect", 12345, (), 0x1, udp_reject="some")


def test_without_fake_ranges_there_is_no_filter_chain():
    settings = RuleSettings("redirect", 12345, (), 0x1, redirect_output=True)
    assert "*filter" not in iptables_restore(settings, 4) and "udp" not in nft_script(settings)


def test_only_the_families_with_a_fake_range_get_rules():
    settings = RuleSettings("redirect", 12345, (), 0x1, fake_ip_ranges=("10.99.0.0/24",))
    assert "*filter" not in iptables_restore(settings, 6) and "-d 10.99.0.0/24 -p tcp" in iptables_restore(settings, 4)
    assert "ip6 daddr { fc00" not in nft_script(settings)


def test_a_bad_fake_range_gives_one_line():
    with pytest.raises(RulesError, match="invalid address or CIDR 'nope'"):
        RuleSettings("redirect", 12345, (), 0x1, fake_ip_ranges=("nope",))


def test_iptables_apply_takes_out_a_udp_chain_left_by_an_earlier_apply(monkeypatch):
    host = FakeHost(
        {
            "iptables -w 5 -t filter -S": "-P FORWARD ACCEPT\n-N RELAY_UDP\n"
            "-A FORWARD -i lan0 -p udp -j RELAY_UDP\n-A RELAY_UDP -d 198.18.0.0/15 -j REJECT\n"
        }
    )
    monkeypatch.setattr(rules, "_run", host)
    rules.apply(RuleSettings("redirect", 12345, ("lan0",), 0x1, ipv6=False), "iptables")
    [(_, script)] = [call for call in host.calls if call[0][0] == "iptables-restore"]
    assert script.split("COMMIT\n")[1].splitlines() == [
        "*filter",
        "-D FORWARD -i lan0 -p udp -j RELAY_UDP",
        "-F RELAY_UDP",
        "-X RELAY_UDP",
    ]


def test_nft_merges_a_bypass_inside_a_private_range():
    # nft refuses overlapping elements in one anonymous interval set.
    script = nft_script(RuleSettings("redirect", 12345, (), 0x1, ("10.1.0.0/16", "fd00::1")))
    assert "10.1.0.0/16" not in script and "fd00::1" not in script and "10.0.0.0/8" in script


def test_nft_replaces_its_table_in_one_transaction():
    script = nft_script(RuleSettings("redirect", 12345, (), 0x1))
    assert script.startswith("table inet relay\ndelete table inet relay\ntable inet relay {\n")


DNS = (("0.0.0.0", 5353), ("fd00::53", 5354))


@pytest.mark.parametrize("mode", rules.MODES)
def test_iptables_sends_the_lans_port_53_to_the_dns_service_and_not_to_the_relay(mode):
    settings = RuleSettings(mode, 12345, ("lan0", "wlan0"), 0x1, dns=DNS)
    v4, v6 = iptables_restore(settings, 4), iptables_restore(settings, 6)
    assert chain_rules(v4, "RELAY_DNS") == [
        "-A RELAY_DNS -p udp -j REDIRECT --to-ports 5353",
        "-A RELAY_DNS -p tcp -j REDIRECT --to-ports 5353",
    ]
    assert chain_rules(v6, "RELAY_DNS") == [
        "-A RELAY_DNS -p udp -j DNAT --to-destination [fd00::53]:5354",
        "-A RELAY_DNS -p tcp -j DNAT --to-destination [fd00::53]:5354",
    ]
    for text in (v4, v6):
        nat = text.split("*nat\n", 1)[1].split("COMMIT", 1)[0]
        assert chain_rules(nat, "PREROUTING")[-4:] == [
            f"-A PREROUTING -i {iface} -p {protocol} --dport 53 -j RELAY_DNS"
            for iface in ("lan0", "wlan0")
            for protocol in ("udp", "tcp")
        ]
        relay_jumps = [rule for rule in chain_rules(text, "PREROUTING") if rule.endswith("-j RELAY")]
        assert relay_jumps == [f"-A PREROUTING -i {iface} -p tcp ! --dport 53 -j RELAY" for iface in ("lan0", "wlan0")]


@pytest.mark.parametrize("mode", rules.MODES)
def test_nft_sends_the_lans_port_53_to_the_dns_service_and_not_to_the_relay(mode):
    script = nft_script(RuleSettings(mode, 12345, ("lan0",), 0x1, dns=DNS))
    assert nft_chain(script, "dns") == [
        "type nat hook prerouting priority dstnat; policy accept;",
        'iifname { "lan0" } meta nfproto ipv4 meta l4proto { tcp, udp } th dport 53 redirect to :5353',
        'iifname { "lan0" } meta nfproto ipv6 meta l4proto { tcp, udp } th dport 53 dnat ip6 to [fd00::53]:5354',
    ]
    assert nft_chain(script, "prerouting")[1] == 'iifname { "lan0" } meta l4proto tcp tcp dport != 53 jump intercept'


def test_without_ipv6_dns_leaves_ipv6_alone_and_needs_no_ipv6_address():
    settings = RuleSettings("redirect", 12345, (), 0x1, ipv6=False, dns=(("10.0.0.1", 53),))
    assert nft_chain(nft_script(settings), "dns")[1:] == [
        'iifname != "lo" meta nfproto ipv4 meta l4proto { tcp, udp } th dport 53 dnat ip to 10.0.0.1:53'
    ]


def test_without_dns_port_53_is_relayed_like_any_tcp():
    settings = RuleSettings("tproxy", 12345, ("lan0",), 0x1)
    assert "53" not in iptables_restore(settings, 4) and "RELAY_DNS" not in iptables_restore(settings, 6)
    assert "chain dns" not in nft_script(settings) and "dport" not in nft_script(settings)


@pytest.mark.parametrize(
    "dns,v4,v6",
    [
        ((("127.0.0.1", 1), ("10.0.0.1", 2), ("0.0.0.0", 3), ("::", 4)), "redirect to :3", "redirect to :4"),
        ((("127.0.0.1", 1), ("10.0.0.1", 2), ("fd00::1", 5)), "dnat ip to 10.0.0.1:2", "dnat ip6 to [fd00::1]:5"),
        ((("127.0.0.1", 1), ("::1", 6), ("fd00::1", 5)), "dnat ip to 127.0.0.1:1", "dnat ip6 to [fd00::1]:5"),
    ],
)
def test_dns_target_is_the_wildcard_then_an_address_then_loopback(dns, v4, v6):
    rules_text = nft_chain(nft_script(RuleSettings("redirect", 12345, (), 0x1, dns=dns)), "dns")[1:]
    assert [rule.split("th dport 53 ")[1] for rule in rules_text] == [v4, v6]


def test_route_commands():
    settings = RuleSettings("tproxy", 12345, (), 0x1, tproxy_mark=0x100, route_table=123)
    assert route_commands(settings, "add") == [
        ["ip", "-4", "rule", "add", "fwmark", "0x100/0x100", "lookup", "123"],
        ["ip", "-4", "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", "123"],
        ["ip", "-6", "rule", "add", "fwmark", "0x100/0x100", "lookup", "123"],
        ["ip", "-6", "route", "replace", "local", "::/0", "dev", "lo", "table", "123"],
    ]
    assert route_commands(settings, "del")[1] == [
        "ip",
        "-4",
        "route",
        "del",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        "123",
    ]
    v4_only = RuleSettings("tproxy", 12345, (), 0x1, ipv6=False)
    assert [command[1] for command in route_commands(v4_only, "del")] == ["-4", "-4"]
    assert route_commands(RuleSettings("redirect", 12345, (), 0x1), "add") == []


def test_describe_shows_everything_apply_installs():
    settings = RuleSettings("tproxy", 12345, ("lan0",), 0x1)
    text = describe(settings, "iptables")
    assert iptables_restore(settings, 4) in text and iptables_restore(settings, 6) in text
    assert "ip -6 route replace local ::/0 dev lo table 100" in text
    nft_text = describe(settings, "nft")
    assert nft_script(settings) in nft_text and "ip -4 rule add fwmark 0x100/0x100 lookup 100" in nft_text
    assert "iptables" not in describe(RuleSettings("redirect", 12345, (), 0x1), "nft")


@pytest.mark.parametrize(
    "arguments,message",
    [
        (dict(mode="bridge"), "unknown mode"),
        (dict(port=0), "not in 1-65535"),
        (dict(lan_ifaces=("lan 0",)), "invalid interface name"),
        (dict(lan_ifaces=('x"; flush ruleset',)), "invalid interface name"),
        (dict(mark=0), "mark 0x0"),
        (dict(mode="tproxy", mark=0x101), "shares bits with the TPROXY mark"),
        (dict(exempt=("10.0.0.300",)), "invalid address or CIDR"),
        (dict(route_table=254), "reserved"),
        (dict(dns=(("0.0.0.0", 5353),)), r"--dns has no IPv6 address.*add one, such as \[::\]:5353"),
        (dict(dns=(("[::]", 5353),)), "invalid DNS service address"),
        (dict(dns=(("0.0.0.0", 0), ("::", 53))), "DNS port 0"),
        (dict(dns=(("0.0.0.0", 53), ("::1", 53))), r"\[::1\]:53 is on loopback.*bind it to \[::\]:53"),
    ],
)
def test_bad_settings_give_one_line(arguments, message):
    with pytest.raises(RulesError, match=message) as caught:
        RuleSettings(**{"mode": "redirect", "port": 12345, "lan_ifaces": (), "mark": 0x1, **arguments})
    assert "\n" not in str(caught.value)


def test_bad_backend():
    with pytest.raises(RulesError, match="unknown firewall backend"):
        rules.apply(RuleSettings("redirect", 1, (), 1), "pf")


class FakeHost:
    """Stands in for rules._run: canned listings in, commands (and their stdin) recorded."""

    def __init__(self, listings):
        self.listings = listings
        self.calls = []

    def __call__(self, argv, stdin=None, check=True):
        self.calls.append((argv, stdin))
        return self.listings.get(" ".join(argv), "")


NAT_WITH_AN_EARLIER_APPLY = """-P PREROUTING ACCEPT
-N RELAY
-N DOCKER
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A PREROUTING -i old0 -p tcp -j RELAY
-A RELAY -p tcp -j REDIRECT --to-ports 1
"""
MANGLE_WITH_AN_EARLIER_TPROXY = """-P PREROUTING ACCEPT
-N RELAY
-N RELAY_OUTPUT
-A PREROUTING -i lan0 -p tcp -j RELAY
-A OUTPUT -p tcp -j RELAY_OUTPUT
"""


def test_iptables_apply_replaces_what_an_earlier_apply_left(monkeypatch):
    host = FakeHost(
        {
            "iptables -w 5 -t nat -S": NAT_WITH_AN_EARLIER_APPLY,
            "iptables -w 5 -t mangle -S": MANGLE_WITH_AN_EARLIER_TPROXY,
        }
    )
    monkeypatch.setattr(rules, "_run", host)
    rules.apply(RuleSettings("redirect", 12345, ("lan0",), 0x1, ipv6=False), "iptables")
    [(argv, script)] = [call for call in host.calls if call[0][0] == "iptables-restore"]
    assert argv == ["iptables-restore", "-w", "5", "--noflush"]
    nat, mangle = script.split("COMMIT\n")[:2]
    assert nat.splitlines()[:3] == ["*nat", ":RELAY - [0:0]", "-D PREROUTING -i old0 -p tcp -j RELAY"]
    assert nat.splitlines()[-1] == "-A PREROUTING -i lan0 -p tcp -j RELAY"
    assert "DOCKER" not in script
    assert mangle.splitlines() == [
        "*mangle",
        "-D PREROUTING -i lan0 -p tcp -j RELAY",
        "-D OUTPUT -p tcp -j RELAY_OUTPUT",
        "-F RELAY",
        "-F RELAY_OUTPUT",
        "-X RELAY",
        "-X RELAY_OUTPUT",
    ]


def test_iptables_remove_when_nothing_is_installed_runs_no_restore(monkeypatch):
    host = FakeHost({})
    monkeypatch.setattr(rules, "_run", host)
    rules.remove(RuleSettings("redirect", 12345, (), 0x1), "iptables")
    assert [argv[0] for argv, _ in host.calls] == ["iptables"] * 3 + ["ip6tables"] * 3  # nat, mangle, filter


NAT_WITH_AN_EARLIER_DNS = """-P PREROUTING ACCEPT
-N RELAY
-N RELAY_DNS
-A PREROUTING -i lan0 -p tcp -m tcp ! --dport 53 -j RELAY
-A PREROUTING -i lan0 -p udp -m udp --dport 53 -j RELAY_DNS
"""


def test_iptables_remove_takes_the_dns_chain_out_too(monkeypatch):
    host = FakeHost({"iptables -w 5 -t nat -S": NAT_WITH_AN_EARLIER_DNS})
    monkeypatch.setattr(rules, "_run", host)
    rules.remove(RuleSettings("redirect", 12345, ("lan0",), 0x1), "iptables")  # no --dns given this time
    [(_, script)] = [call for call in host.calls if call[0][0] == "iptables-restore"]
    assert script.splitlines() == [
        "*nat",
        "-D PREROUTING -i lan0 -p tcp -m tcp ! --dport 53 -j RELAY",
        "-D PREROUTING -i lan0 -p udp -m udp --dport 53 -j RELAY_DNS",
        "-F RELAY",
        "-F RELAY_DNS",
        "-X RELAY",
        "-X RELAY_DNS",
        "COMMIT",
    ]


LOOPBACK_DNS = RuleSettings("redirect", 12345, ("lan0", "eth0.10"), 0x1, dns=(("127.0.0.1", 5353), ("::", 5353)))


def fake_sysctls(monkeypatch, values):
    monkeypatch.setattr(rules, "_sysctl", lambda *path: values.get("/".join(path), ""))


def test_loopback_dns_is_not_applied_without_route_localnet(monkeypatch):
    fake_sysctls(monkeypatch, {"net/ipv4/conf/lan0/route_localnet": "1", "net/ipv4/conf/all/route_localnet": "0"})
    host = FakeHost({})
    monkeypatch.setattr(rules, "_run", host)
    with pytest.raises(RulesError) as caught:
        rules.apply(LOOPBACK_DNS, "nft")
    assert str(caught.value) == (
        "--dns 127.0.0.1:5353 is on loopback, which the LAN's queries reach only with route_localnet "
        "(sysctl -w net.ipv4.conf.eth0/10.route_localnet=1; it opens the router's other loopback services "
        "to the LAN too): better bind --dns to 0.0.0.0 or a LAN address"
    )
    assert host.calls == []
    assert "# --dns 127.0.0.1:5353 is on loopback: needs sysctl -w net.ipv4.conf.lan0.route_localnet=1; " in (
        describe(LOOPBACK_DNS, "nft")
    )


@pytest.mark.parametrize(
    "sysctls",
    [
        {"net/ipv4/conf/all/route_localnet": "1"},
        {"net/ipv4/conf/lan0/route_localnet": "1", "net/ipv4/conf/eth0.10/route_localnet": "1"},
    ],
)
def test_loopback_dns_is_applied_with_route_localnet(monkeypatch, sysctls):
    fake_sysctls(monkeypatch, sysctls)
    host = FakeHost({})
    monkeypatch.setattr(rules, "_run", host)
    rules.apply(LOOPBACK_DNS, "nft")
    assert [argv for argv, _ in host.calls] == [["nft", "-f", "-"]]


def test_tproxy_apply_adds_an_ip_rule_only_once(monkeypatch):
    rule = "ip -4 rule show fwmark 0x100/0x100 lookup 100"
    host = FakeHost({rule: "32765:\tfrom all fwmark 0x100/0x100 lookup 100\n"})
    monkeypatch.setattr(rules, "_run", host)
    rules.apply(RuleSettings("tproxy", 12345, (), 0x1), "nft")
    commands = [" ".join(argv) for argv, _ in host.calls]
    assert commands[-1] == "nft -f -"
    assert "ip -4 rule add fwmark 0x100/0x100 lookup 100" not in commands
    assert "ip -6 rule add fwmark 0x100/0x100 lookup 100" in commands


def test_a_failing_command_is_one_line():
    with pytest.raises(RulesError, match=r"^false failed \(exit status 1\): no message$"):
        rules._run(["false"])
    with pytest.raises(RulesError, match="not found"):
        rules._run(["relay-no-such-command"])


# -- the real tools accept the text (in a private network namespace: nothing is committed anyway)


def require_root():
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the iptables/nft syntax checks need root, and CI must run them")
        pytest.skip("the iptables/nft syntax checks need root")


def check_in_new_netns(argv, text):
    result = subprocess.run(["unshare", "--net", "--", *argv], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{argv}: {result.stderr}\n{text}"


@pytest.mark.parametrize("settings", ALL_SETTINGS, ids=settings_id)
def test_iptables_restore_accepts_the_text(settings):
    require_root()
    check_in_new_netns(["iptables-restore", "--test", "--noflush"], iptables_restore(settings, 4))
    check_in_new_netns(["ip6tables-restore", "--test", "--noflush"], iptables_restore(settings, 6))


@pytest.mark.parametrize("settings", ALL_SETTINGS, ids=settings_id)
def test_nft_accepts_the_script(settings):
    require_root()
    check_in_new_netns(["nft", "-c", "-f", "-"], nft_script(settings))


@pytest.mark.parametrize("mode,ranges", [("real", ()), ("fake-ip", FAKE_IP_RANGES)])
def test_relay_rules_takes_the_fake_ranges_in_fake_ip_mode_only(mode, ranges):
    values = {"upstream": ["127.0.0.1:3128"], "mark": "0x1", "dns": ["0.0.0.0:53", "[::]:53"], "dns-mode": mode}
    assert settings_for(Config.from_values(values)).fake_ip_ranges == ranges


def test_udp_relayed_is_tproxied_past_the_tcp_exemptions_in_both_backends():
    settings = RuleSettings("tproxy", 12345, ("lan0",), 0x1, EXEMPT, udp=True)
    for version in (4, 6):
        lines = iptables_restore(settings, version).splitlines()
        target = "-j TPROXY --on-port 12345 --tproxy-mark 0x100/0x100"
        assert lines.index(f"-A RELAY -p udp {target}") == lines.index(f"-A RELAY -p tcp {target}") + 1
        assert "-A PREROUTING -i lan0 -p udp -j RELAY" in lines
        assert not any("-p udp -m socket" in line for line in lines)  # replies' sockets must not take datagrams
    script = nft_script(settings)
    assert 'iifname { "lan0" } meta l4proto udp jump intercept_udp' in nft_chain(script, "prerouting")
    chain = nft_chain(script, "intercept_udp")
    assert chain[0] == "meta mark & 0x1 == 0x1 return" and "socket" not in " ".join(chain)
    assert chain[-2:] == [
        "meta nfproto ipv4 meta l4proto udp tproxy ip to :12345 meta mark set meta mark | 0x100 accept",
        "meta nfproto ipv6 meta l4proto udp tproxy ip6 to :12345 meta mark set meta mark | 0x100 accept",
    ]
    tcp_chain = nft_chain(script, "intercept")
    assert tcp_chain[2] == "tcp flags & (fin | syn | rst | ack) != syn return"  # TCP's alone
    assert tcp_chain[3:-2] == chain[1:-2]  # the same exemptions, in the same order


def test_udp_relayed_leaves_port_53_to_the_dns_service_and_needs_tproxy():
    settings = RuleSettings("tproxy", 12345, ("lan0",), 0x1, udp=True, dns=(("0.0.0.0", 53), ("::", 53)))
    assert "-A PREROUTING -i lan0 -p udp ! --dport 53 -j RELAY" in iptables_restore(settings, 4)
    assert 'iifname { "lan0" } meta l4proto udp udp dport != 53 jump intercept_udp' in nft_script(settings)
    with pytest.raises(RulesError, match="needs mode tproxy"):
        RuleSettings("redirect", 12345, ("lan0",), 0x1, udp=True)


def test_no_udp_rules_when_udp_is_off():
    settings = RuleSettings("tproxy", 12345, ("lan0",), 0x1)
    assert "udp" not in iptables_restore(settings, 4) and "intercept_udp" not in nft_script(settings)


@pytest.mark.parametrize(
    "upstream,udp,relayed,reject",
    [
        ("socks5://10.0.0.5:1080", "on", True, "off"),
        ("socks5://127.0.0.1:1081", None, False, "quic"),  # ssh -D: nothing says it carries UDP
        ("socks5://10.0.0.5:1080", "off", False, "quic"),
    ],
)
def test_relay_rules_relays_udp_only_when_the_relay_does(upstream, udp, relayed, reject):
    values = {"upstream": upstream, "mode": "tproxy", "mark": "0x1"}
    if udp:
        values["udp"] = udp
    settings = settings_for(Config.from_values(values))
    assert (settings.udp, settings.udp_reject) == (relayed, reject)
