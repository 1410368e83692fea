import ipaddress

import pytest

from relay.config import (
    Config,
    ConfigError,
    Secret,
    Upstream,
    parse_dns_upstream,
    parse_host_port,
    parse_upstream,
    redact_url,
)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("127.0.0.1:3128", Upstream("http", "127.0.0.1", 3128)),
        ("localhost:3128", Upstream("http", "localhost", 3128)),
        ("http://10.0.0.1:8080", Upstream("http", "10.0.0.1", 8080)),
        ("HTTP://10.0.0.1:8080/", Upstream("http", "10.0.0.1", 8080)),
        ("socks5://[::1]:1080", Upstream("socks5", "::1", 1080)),
        ("socks4://h:1080", Upstream("socks4", "h", 1080)),
        ("socks4a://user@h:1080", Upstream("socks4a", "h", 1080, "user")),
        ("direct", Upstream("direct")),
    ],
)
def test_parse_upstream(text, expected):
    assert parse_upstream(text) == expected


def test_credentials_are_percent_decoded_and_hidden():
    upstream = parse_upstream("socks5://us%40er:p%3Ass@h:1080")
    assert upstream.username == "us@er" and upstream.password.reveal() == "p:ss"
    for shown in (str(upstream), repr(upstream), repr(upstream.password), f"{upstream.password}"):
        assert "p:ss" not in shown and "p%3Ass" not in shown
    assert str(upstream) == "socks5://us%40er:***@h:1080"


@pytest.mark.parametrize(
    "text,message",
    [
        ("ftp://h:21", "unknown scheme 'ftp'"),
        ("h", "a port is required"),
        ("http://h", "a port is required"),
        ("h:0", "a port is required"),
        ("h:70000", "out of range"),
        ("h:port", "invalid upstream"),
        ("http://h:1/path", "only SCHEME://"),
        ("http://h:1?q=1", "only SCHEME://"),
        ("http://:1", "no host"),
        ("socks4://u:pw@h:1", "SOCKS4 has no passwords"),
        ("http://user@h:1", "give the password too"),
        ("socks5://user@h:1", "give the password too"),
        ("http://us%3Aer:pw@h:1", "cannot contain ':'"),
        ("http://[::1:3128", "invalid upstream"),
    ],
)
def test_bad_upstreams(text, message):
    with pytest.raises(ConfigError, match="invalid upstream") as caught:
        parse_upstream(text)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "text", ["http://user:hunter2@h", "socks5://u:hunter2@:1", "bogus://u:hunter2@h:1", "socks4://u:hunter2@h:1"]
)
def test_errors_never_show_the_password(text):
    with pytest.raises(ConfigError) as caught:
        parse_upstream(text)
    assert "hunter2" not in str(caught.value) and "***" in str(caught.value)


def test_redact_url():
    assert redact_url("http://a:b@h:1") == "http://a:***@h:1"
    assert redact_url("http://a@h:1") == "http://a@h:1"
    assert redact_url("h:1") == "h:1"


@pytest.mark.parametrize(
    "text,expected",
    [("0.0.0.0:12345", ("0.0.0.0", 12345)), ("[::]:1", ("::", 1)), ("[fd00::1]:65535", ("fd00::1", 65535))],
)
def test_parse_host_port(text, expected):
    assert parse_host_port(text) == expected


@pytest.mark.parametrize(
    "text", ["12345", ":1", "host:1", "::1:1", "1.2.3.4:0", "1.2.3.4:65536", "1.2.3.4:x", "[1.2.3.4]:1x"]
)
def test_bad_host_ports(text):
    with pytest.raises(ConfigError):
        parse_host_port(text)


def test_secret_equality_without_exposure():
    assert Secret("a") == Secret("a") and Secret("a") != Secret("b")
    assert "a" not in repr(Secret("a"))


@pytest.mark.parametrize(
    "text,shown",
    [
        ("udp://9.9.9.9", "udp://9.9.9.9:53"),
        ("tcp://[2001:db8::1]:5353", "tcp://[2001:db8::1]:5353"),
        ("https://1.1.1.1/dns-query", "https://1.1.1.1:443/dns-query"),
        ("https://Dns.Example:8443/q?x=1", "https://dns.example:8443/q?x=1"),
        ("https://dns.example", "https://dns.example:443/dns-query"),
    ],
)
def test_dns_upstreams(text, shown):
    assert str(parse_dns_upstream(text)) == shown


@pytest.mark.parametrize(
    "text",
    ["tcp://name.example", "ftp://1.1.1.1", "https://1.1.1.1:0/x", "udp://1.1.1.1/x", "https://[::1", "1.1.1.1",
     "https://-bad-.example/q", "udp://1.1.1.1:99999"],
)  # fmt: skip
def test_bad_dns_upstreams_are_refused(text):
    with pytest.raises(ConfigError):
        parse_dns_upstream(text)


def test_a_dns_upstream_with_a_password_is_refused_without_showing_it():
    with pytest.raises(ConfigError) as caught:
        parse_dns_upstream("https://user:Secret-1@dns.example/q")
    assert "Secret-1" not in str(caught.value)


def test_dns_defaults_resolve_through_the_tunnel_and_answer_private_ranges_only():
    config = Config.from_values({"upstream": ["127.0.0.1:3128"]})
    assert config.dns == [] and [str(u) for u in config.dns_upstream] == [
        "https://1.1.1.1:443/dns-query",
        "https://8.8.8.8:443/dns-query",
    ]
    allowed = lambda address: any(ipaddress.ip_address(address) in net for net in config.dns_allow)  # noqa: E731
    assert allowed("192.168.1.20") and allowed("fd00::5") and allowed("127.0.0.1")
    assert not allowed("203.0.113.9") and not allowed("2001:db8::1")
