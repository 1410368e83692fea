"""The connection side of fake-ip mode: a destination's name, or a reset for a fake address no name holds."""

import ipaddress
import logging

from relay.dns.fakeip import FakeIps
from relay.dns.message import parse_query
from relay.logs import RateLimited
from relay.net.fake_ips import NAME_FROM, UNKNOWN, UNKNOWN_ENDED, fake_ip_name, refuse_unknown
from tests.dns.support import query


def pool(max_names: int = 32768) -> FakeIps:
    return FakeIps([ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("fc00::/18")], [], max_names)


def given(fake_ips: FakeIps, name: str, rdtype: str = "A") -> None:
    fake_ips.answer(parse_query(query(name, rdtype)))


def test_a_fake_address_given_to_a_name_is_opened_by_that_name():
    fake_ips = pool()
    given(fake_ips, "ssh.example.com")
    given(fake_ips, "ssh.example.com", "AAAA")
    assert fake_ip_name(fake_ips, "198.18.0.1") == "ssh.example.com"
    assert fake_ip_name(fake_ips, "fc00::1") == "ssh.example.com"
    assert fake_ip_name(fake_ips, "::ffff:198.18.0.1") == "ssh.example.com"
    assert NAME_FROM == "fake-ip"


def test_other_addresses_and_real_mode_leave_the_connection_as_it_was():
    fake_ips = pool()
    given(fake_ips, "ssh.example.com")
    assert fake_ip_name(fake_ips, "192.0.2.1") is None and fake_ip_name(fake_ips, "2001:db8::1") is None
    assert fake_ip_name(None, "198.18.0.1") is None


def test_a_fake_address_no_name_holds_is_unknown():
    fake_ips = pool()
    given(fake_ips, "ssh.example.com")
    assert fake_ip_name(fake_ips, "198.18.0.2") is UNKNOWN
    assert fake_ip_name(fake_ips, "198.18.0.0") is UNKNOWN  # the range's own address is never given
    assert fake_ip_name(fake_ips, "fc00::1") is UNKNOWN


def test_a_connection_keeps_its_name_from_being_recycled():
    fake_ips = pool(max_names=2)
    given(fake_ips, "old.example")
    given(fake_ips, "newer.example")
    assert fake_ip_name(fake_ips, "198.18.0.1") == "old.example"  # connected to: now the most recently used
    given(fake_ips, "newest.example")
    assert fake_ip_name(fake_ips, "198.18.0.1") == "old.example"
    assert fake_ip_name(fake_ips, "198.18.0.2") == "newest.example"


def test_resets_for_unknown_fake_addresses_are_logged_once_an_interval(caplog):
    caplog.set_level(logging.WARNING, logger="relay")
    now = [0.0]
    warnings = RateLimited(interval=10.0, clock=lambda: now[0])
    ends = [refuse_unknown(warnings, ("10.0.0.5", 40000 + i), ("198.18.0.9", 22)) for i in range(50)]
    now[0] = 11.0
    refuse_unknown(warnings, ("10.0.0.6", 1), ("198.18.0.7", 443))
    assert ends == [UNKNOWN_ENDED] * 50
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("connection from 10.0.0.5:40000 to 198.18.0.9:22 reset: no name holds that fake")
    assert "(49 more like this suppressed)" in lines[1]
