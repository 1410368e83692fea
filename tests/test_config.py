import ipaddress
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import (
    SETTINGS,
    Config,
    ConfigError,
    Secret,
    Upstream,
    local_dns_upstreams,
    parse_cidr,
    parse_dns_upstream,
    parse_fake_ip_range,
    parse_host_port,
    parse_upstream,
    redact_url,
)
from relay.dns.service import allowed_networks
from relay.options import build_parser, load_config


@pytest.mark.parametrize(
    "text,expected",
    [
        ("127.0.0.1:3128", Upstream("http", "127.0.0.1", 3128)),
        ("localhost:3128", Upstream("http", "localhost", 3128)),
        ("http://10.0.0.1:8080", Upstream("http", "10.0.0.1", 8080)),
        ("HTTP://10.0.0.1:8080/", Upstream("http", "10.0.0.1", 8080)),
        ("socks5://[::1]:1080", Upstream("socks5", "::1", 1080)),
        ("socks5://[FE80::1%Eth0]:1080/", Upstream("socks5", "fe80::1%Eth0", 1080)),
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
        ("h:0", "out of range"),
        ("h:70000", "out of range"),
        ("h:port", "the port is not a number"),
        ("h:١٢", "the port is not a number"),
        ("http://h:1/path", "only SCHEME://"),
        ("http://h:1?q=1", "only SCHEME://"),
        ("http://h:1#", "only SCHEME://"),
        ("http://:1", "no host"),
        ("http://", "no host"),
        ("http://h h:1", "not a name or an address"),
        ("http://a:b:1", "write an IPv6 address as [ADDR]:PORT"),
        ("socks4://u:pw@h:1", "SOCKS4 has no passwords"),
        ("http://us%3Aer:pw@h:1", "cannot contain ':'"),
        ("http://[::1:3128", "closing ']'"),
        ("http://[1.2.3.4]:1", "not an IPv6 address"),
        ("http://[::1]3128", "expected :PORT after ']'"),
        ("u:pw@h:1", "needs a scheme"),
        ("socks5://u:\udcff@h:1", "must be UTF-8 text"),
        ("http://\udcff:p@h:1", "must be UTF-8 text"),
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
    assert "hunter2" not in str(caught.value)


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
    networks = allowed_networks(config)
    allowed = lambda address: any(ipaddress.ip_address(address) in net for net in networks)  # noqa: E731
    assert allowed("192.168.1.20") and allowed("fd00::5") and allowed("127.0.0.1")
    assert not allowed("203.0.113.9") and not allowed("2001:db8::1")


def test_local_dns_defaults_to_resolv_conf_and_names_no_public_resolver_answers():
    config = Config.from_values({"upstream": ["127.0.0.1:3128"]})
    assert config.dns_local == [] and config.dns_local_domain == ["home.arpa", "internal", "lan"]


def test_local_dns_and_its_domains_are_parsed_like_dns_upstreams_and_bypass_domains():
    config = Config.from_values(
        {
            "upstream": ["127.0.0.1:3128"],
            "dns-local": ["udp://192.168.1.1", "tcp://[fd00::1]:5353"],
            "dns-local-domain": ["Corp.Example.", "lan"],
        }
    )
    assert [str(u) for u in config.dns_local] == ["udp://192.168.1.1:53", "tcp://[fd00::1]:5353"]
    assert config.dns_local_domain == ["corp.example", "lan"]
    assert local_dns_upstreams(config, resolv_conf="/nonexistent") == config.dns_local  # no file read


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("dns-local", "192.168.1.1", "--dns-local #2: '192.168.1.1': a DNS upstream is udp://IP"),
        ("dns-local", "udp://router.lan", "--dns-local #2: 'udp://router.lan': a DNS upstream is udp://IP"),
        ("dns-local-domain", "bad..name", "--dns-local-domain #2: invalid domain suffix 'bad..name'"),
        ("dns-local-domain", ".", "--dns-local-domain #2: invalid domain suffix '.'"),
    ],
)
def test_bad_local_dns_settings_say_which_and_why(key, value, message):
    first = "udp://10.0.0.1" if key == "dns-local" else "lan"
    with pytest.raises(ConfigError) as caught:
        Config.from_values({"upstream": ["direct"], key: [first, value]}, key_prefix="--")
    assert str(caught.value).startswith(message)


def local_for(tmp_path, resolv_conf: str, **values) -> list[str]:
    path = tmp_path / "resolv.conf"
    path.write_text(resolv_conf)
    config = Config.from_values({"upstream": ["direct"], **values})
    return [str(upstream) for upstream in local_dns_upstreams(config, resolv_conf=str(path))]


def test_local_dns_by_default_is_the_first_three_nameservers_of_resolv_conf(tmp_path):
    resolv_conf = (
        "# generated by dhcp\n"
        "search lan\n"
        "nameserver 192.168.1.1\n"
        "nameserver not-an-address\n"  # skipped, as glibc skips it
        "; nameserver 10.9.9.9\n"
        "nameserver   fd00::1  \n"
        "options edns0\n"
        "nameserver fe80::1%eth0\n"
        "nameserver 10.0.0.4\n"  # a fourth: glibc reads three
    )
    assert local_for(tmp_path, resolv_conf) == ["udp://192.168.1.1:53", "udp://[fd00::1]:53", "udp://[fe80::1%eth0]:53"]


def test_the_relays_own_dns_service_in_resolv_conf_is_passed_over(tmp_path):
    """A router that asks the relay for its own lookups: its local questions must not come back to the relay."""
    resolv_conf = "nameserver 127.0.0.1\nnameserver 192.168.1.1\n"
    assert local_for(tmp_path, resolv_conf, dns=["0.0.0.0:53"]) == ["udp://192.168.1.1:53"]
    assert local_for(tmp_path, resolv_conf, dns=["127.0.0.1:5353"]) == ["udp://127.0.0.1:53", "udp://192.168.1.1:53"]


@pytest.mark.parametrize(
    "resolv_conf,dns,message",
    [
        ("", [], "names no nameserver: give the LAN's resolver with --dns-local udp://IP"),
        ("search lan\nnameserver dhcp-pending\n", [], "names no nameserver"),
        ("nameserver 127.0.0.1\n", ["[::]:53"], "names only this relay's own --dns: give the LAN's resolver"),
        ("nameserver 192.168.1.1\n", ["192.168.1.1:53"], "names only this relay's own --dns"),
    ],
)
def test_no_local_resolver_in_resolv_conf_is_a_clear_error(tmp_path, resolv_conf, dns, message):
    with pytest.raises(ConfigError) as caught:
        local_for(tmp_path, resolv_conf, dns=dns)
    assert f"resolv.conf {message}" in str(caught.value)


def test_an_unreadable_resolv_conf_is_a_clear_error(tmp_path):
    config = Config.from_values({"upstream": ["direct"]})
    with pytest.raises(ConfigError) as caught:
        local_dns_upstreams(config, resolv_conf=str(tmp_path / "missing"))
    assert str(caught.value) == (
        f"cannot read {tmp_path / 'missing'} for the local DNS resolver: No such file or directory; give --dns-local"
    )


def test_a_local_resolver_that_is_the_relays_own_dns_service_is_refused():
    config = Config.from_values(
        {"upstream": ["direct"], "dns": ["0.0.0.0:53"], "dns-local": ["udp://192.168.1.1", "tcp://127.0.0.1"]}
    )
    with pytest.raises(ConfigError) as caught:
        local_dns_upstreams(config, resolv_conf="/nonexistent")
    assert str(caught.value) == "--dns-local #2: tcp://127.0.0.1:53 is this relay's own --dns, which would ask itself"


def test_fake_ip_defaults_are_the_benchmarking_range_and_the_start_of_ula():
    config = Config.from_values({"upstream": ["127.0.0.1:3128"]})
    assert config.dns_mode == "real" and config.state_dir == "/var/lib/relay"
    assert [str(network) for network in config.fake_ip_range] == ["198.18.0.0/15", "fc00::/18"]
    assert {"pool.ntp.org", "msftncsi.com", "captive.apple.com", "local", "lan"} <= set(config.fake_ip_exclude)


def test_fake_ip_ranges_given_replace_the_defaults():
    config = Config.from_values(
        {
            "upstream": ["127.0.0.1:3128"],
            "dns": ["127.0.0.1:53"],
            "dns-mode": "fake-ip",
            "fake-ip-range": ["10.99.0.0/24"],
        }
    )
    assert [str(network) for network in config.fake_ip_range] == ["10.99.0.0/24"]


@pytest.mark.parametrize(
    "ranges,complaint",
    [
        (["198.18.0.1/15"], "host bits set"),
        (["198.18.0.0/25"], "too small for fake addresses: at least /24"),
        (["fc00::/121"], "at least /120"),
        (["198.18.0.1"], "too small"),
        (["not-a-network"], "not a network in CIDR form"),
        (["198.18.0.0/15", "198.19.0.0/16"], "198.19.0.0/16 overlaps 198.18.0.0/15"),
    ],
)
def test_bad_fake_ip_ranges_are_clear_errors(ranges, complaint):
    with pytest.raises(ConfigError, match=complaint):
        Config.from_values({"upstream": ["127.0.0.1:3128"], "dns": ["127.0.0.1:53"], "fake-ip-range": ranges})


def test_fake_ip_mode_without_a_dns_service_is_an_error():
    with pytest.raises(ConfigError, match="--dns-mode fake-ip needs --dns"):
        Config.from_values({"upstream": ["127.0.0.1:3128"], "dns-mode": "fake-ip"}, key_prefix="--")


@pytest.mark.parametrize("password", ["Pass#2024", "a/b", "a?b", "a@b", "a:b", "#/?@:", "://x@y", "pä€🔑", "50%off"])
def test_a_password_may_hold_url_delimiters(password):
    """The userinfo ends at the last '@' and the password at nothing: '#', '/', '?' belong to it."""
    upstream = parse_upstream(f"socks5://admin:{password}@127.0.0.1:1081")
    assert (upstream.username, upstream.password.reveal()) == ("admin", password)
    assert (upstream.host, upstream.port) == ("127.0.0.1", 1081)
    assert str(upstream) == "socks5://admin:***@127.0.0.1:1081"


def test_the_user_name_ends_at_the_first_colon_and_may_hold_an_at_sign():
    upstream = parse_upstream("http://ad@min:p:w@d@h:1")
    assert (upstream.username, upstream.password.reveal(), upstream.host) == ("ad@min", "p:w@d", "h")


@pytest.mark.parametrize(
    "userinfo,username,password",
    [("u:p%23w%2F", "u", "p#w/"), ("u:100%25", "u", "100%"), ("u:%zz", "u", "%zz"), ("%C3%A4:x", "ä", "x")],
)
def test_percent_encoding_in_the_userinfo_is_still_decoded(userinfo, username, password):
    upstream = parse_upstream(f"socks5://{userinfo}@h:1080")
    assert (upstream.username, upstream.password.reveal()) == (username, password)


# What may follow the last '@', valid or not, for the property below.
HOST_PARTS = ["127.0.0.1:1081", "h:port", "h:99999", "h:0", "h", ":1081", "", "[::1:1081", "[1.2.3.4]:1", "h:1/x"]
HOST_PARTS += ["h:1?q", "h:1#f", "h h:1", "[::1]:1081/", "a:b:1"]


def _outcome(url: str) -> str:
    """What a user can see of the configuration with this upstream: its error, or its repr and log form."""
    try:
        config = Config.from_values({"upstream": ["127.0.0.1:3128", url]}, key_prefix="--")
    except ConfigError as exc:
        return f"error: {exc}"
    return f"{config!r} {config.upstreams[1]}"


@settings(max_examples=300, deadline=None)
@given(
    password=st.text(st.sampled_from("#/?@:%[]") | st.characters(exclude_categories=["Cs"]), min_size=1, max_size=60),
    scheme=st.sampled_from(["socks5://", "http://", "SOCKS5://", "socks4://", "ftp://", ""]),
    host_part=st.sampled_from(HOST_PARTS),
)
def test_no_error_or_repr_shows_any_password(password, scheme, host_part):
    """Whatever the password holds, what is shown is what a plain password would give: nothing of it leaks.
    (Lone surrogates, from bytes on the command line that are not UTF-8, are refused: test_bad_upstreams.)"""
    shown = _outcome(f"{scheme}admin:{password}@{host_part}")
    assert shown == _outcome(f"{scheme}admin:x@{host_part}")
    assert password not in shown or password in _outcome(f"{scheme}admin:x@{host_part}")


def test_errors_say_which_upstream_without_quoting_it():
    with pytest.raises(ConfigError) as caught:
        Config.from_values({"upstream": ["h:1", "socks5://u:Hunter#2@h:port"]}, key_prefix="--")
    assert str(caught.value) == "--upstream #2: invalid upstream: the port is not a number"


def test_an_upstream_that_is_not_a_string_is_a_config_error():
    with pytest.raises(ConfigError, match="upstream: invalid upstream: .*a string"):
        Config.from_values({"upstream": [3128]})


def _load(tmp_path, *args, password_file: bytes | None = b"Pa#ss/w\xc3\xb6rd\n"):
    path = tmp_path / "password"
    if password_file is not None:
        path.write_bytes(password_file)
    return load_config(build_parser().parse_args([*args, "--upstream-password-file", str(path)]))


def test_the_password_file_completes_upstreams_with_a_user_and_no_password(tmp_path):
    config = _load(
        tmp_path,
        "--upstream",
        "socks5://admin@h:1",
        "--upstream",
        "http://other:own@h:2",
        "--upstream",
        "socks4://id@h:3",
    )
    passwords = [u.password.reveal() if u.password else None for u in config.upstreams]
    assert passwords == ["Pa#ss/wörd", "own", None]
    assert "Pa#ss" not in repr(config)


def test_the_password_file_is_read_again_for_each_load(tmp_path):
    """A reload (SIGHUP) is a new load: it sees the file as it is now."""
    args = build_parser().parse_args(["--upstream", "http://u@h:1", "--upstream-password-file", str(tmp_path / "pw")])
    (tmp_path / "pw").write_text("first\r\n")
    assert load_config(args).upstream.password.reveal() == "first"
    (tmp_path / "pw").write_text("second")
    assert load_config(args).upstream.password.reveal() == "second"


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "cannot read .*: No such file or directory"),
        (b"", "is empty"),
        (b"\n", "is empty"),
        (b"Hunter2\nline two\n", "holds more than one line"),
        (b"Hunter\xff2", "is not UTF-8 text"),
        (b"Hunter2" * 1000, "longer than 4096 bytes"),
    ],
)
def test_a_bad_password_file_is_a_config_error_that_shows_no_content(tmp_path, content, message):
    with pytest.raises(ConfigError, match=f"^--upstream-password-file: .*{message}") as caught:
        _load(tmp_path, "--upstream", "socks5://admin@h:1", password_file=content)
    assert "Hunter" not in str(caught.value)


def test_a_password_file_is_a_directory_is_a_config_error(tmp_path):
    args = build_parser().parse_args(["--upstream", "http://u@h:1", "--upstream-password-file", str(tmp_path)])
    with pytest.raises(ConfigError, match="cannot read .*: Is a directory"):
        load_config(args)


def test_a_password_file_with_no_upstream_to_take_it_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no upstream names a user without a password"):
        _load(tmp_path, "--upstream", "socks5://admin:own@h:1", "--upstream", "h:2")


@pytest.mark.parametrize("url", ["http://Admin7@h:1", "socks5://Admin7@h:1", "socks5://Admin7;Hunter2@h:1"])
def test_a_user_without_password_needs_one(url):
    """The message does not quote the user name either: a typo for ':' would put the password there."""
    with pytest.raises(ConfigError, match="give the password too .*--upstream-password-file") as caught:
        Config.from_values({"upstream": [url]}, key_prefix="--")
    assert "Admin7" not in str(caught.value)


def test_socks5_credentials_longer_than_255_bytes_are_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="SOCKS5 password is longer than 255 bytes") as caught:
        _load(tmp_path, "--upstream", "socks5://admin@h:1", password_file=b"Hunter" + b"x" * 250)
    assert "Hunter" not in str(caught.value)


def test_the_config_file_takes_a_password_with_a_hash_and_a_password_file(tmp_path):
    (tmp_path / "pw").write_text("From-file#1\n")
    (tmp_path / "relay.toml").write_text(
        'upstream = ["socks5://admin:In#line/?@h:1", "http://admin@h:2"]  # a comment\n'
        f'upstream-password-file = "{tmp_path / "pw"}"\n'
    )
    config = load_config(build_parser().parse_args(["--config", str(tmp_path / "relay.toml")]))
    assert [u.password.reveal() for u in config.upstreams] == ["In#line/?", "From-file#1"]


@pytest.mark.parametrize("value", [5, True, 1.5, {"a": 1}, None])
def test_a_toml_value_of_the_wrong_type_is_a_clear_error_for_every_setting(value):
    for setting in SETTINGS:
        values = {"upstream": ["127.0.0.1:3128"], setting.key: [value] if setting.repeatable else value}
        try:
            config = Config.from_values(values, source="relay.toml: ")
        except ConfigError as exc:
            assert str(exc).startswith(f"relay.toml: {setting.key}"), (setting.key, exc)
        else:  # taken: then as what it says, never as text or an address made of a number
            assert setting.parse not in (parse_cidr, parse_fake_ip_range, parse_host_port), (setting.key, config)


def test_server_first_ports_default_to_ssh_mail_ftp_and_mysql_and_may_be_none():
    default = Config.from_values({"upstream": ["127.0.0.1:3128"]}).server_first_ports
    assert default == {21, 22, 25, 110, 143, 587, 3306}
    given = lambda value: Config.from_values({"upstream": ["h:1"], "server-first-ports": value})  # noqa: E731
    assert given(" 22, 2222").server_first_ports == {22, 2222}
    assert given([22, "25"]).server_first_ports == {22, 25}  # a TOML list
    assert given(22).server_first_ports == {22}
    assert given("NONE").server_first_ports == frozenset()


@pytest.mark.parametrize("value", ["", "22,", "0", "65536", "ssh", "22;25", 2.5, True, [True], ["none"]])
def test_bad_server_first_ports_say_what_is_expected(value):
    with pytest.raises(ConfigError, match="server-first-ports: .* is not a list of ports"):
        Config.from_values({"upstream": ["h:1"], "server-first-ports": value}, key_prefix="--")


def test_early_data_is_auto_by_default_and_per_upstream_in_the_config_file(tmp_path):
    (tmp_path / "relay.toml").write_text(
        'early-data = "off"\n'
        'upstream = [{ url = "http://a:3128", early-data = "on" }, "http://b:3128", { url = "socks5://c:1080" }]\n'
    )
    config = load_config(build_parser().parse_args(["--config", str(tmp_path / "relay.toml")]))
    assert [config.early_data_for(upstream) for upstream in config.upstreams] == ["on", "off", "off"]
    assert config.upstreams[0] == Upstream("http", "a", 3128, early_data="on") and str(config.upstreams[0]) == (
        "http://a:3128"
    )
    default = Config.from_values({"upstream": ["h:1", {"url": "h:2", "early-data": "off"}, "socks5://h:3"]})
    assert [default.early_data_for(upstream) for upstream in default.upstreams] == ["auto", "off", "off"]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"url": "h:1", "early-data": "yes"}, "'yes' is not one of: on, off, auto"),
        ({"url": "socks5://h:1", "early-data": "on"}, "early-data is for HTTP proxies"),
        ({"early-data": "on"}, "a table needs its url"),
        ({"url": "h:1", "earlydata": "on"}, "unknown key 'earlydata'"),
        ({"url": 5}, "write it as a string"),
    ],
)
def test_an_upstream_table_that_cannot_work_is_a_clear_error(table, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_values({"upstream": [table]}, source="relay.toml: ")


@pytest.mark.parametrize(
    "values,expected",
    [
        ({}, None),
        ({"preconnect": "off"}, 0),
        ({"preconnect": "auto"}, None),
        ({"preconnect": "3"}, 3),
        ({"preconnect": 64}, 64),
    ],
)
def test_preconnect_is_auto_off_or_a_bounded_number(values, expected):
    assert Config.from_values({"upstream": ["10.0.0.1:3128"], **values}).preconnect == expected


@pytest.mark.parametrize("value", ["0", "65", "-1", "many", 2.5, True])
def test_a_bad_preconnect_names_what_it_takes(value):
    with pytest.raises(ConfigError, match="is not 'auto', 'off' or a number from 1 to 64"):
        Config.from_values({"upstream": ["10.0.0.1:3128"], "preconnect": value})


def test_ssh_connections_default_to_the_cores_at_most_4_and_are_bounded():
    config = Config.from_values({"upstream": ["10.0.0.1:3128"]})
    assert 1 <= config.ssh_connections <= 4
    assert Config.from_values({"upstream": ["10.0.0.1:3128"], "ssh-connections": "16"}).ssh_connections == 16
    with pytest.raises(ConfigError, match="more than 16"):
        Config.from_values({"upstream": ["10.0.0.1:3128"], "ssh-connections": "17"})
    with pytest.raises(ConfigError, match="at least 1"):
        Config.from_values({"upstream": ["10.0.0.1:3128"], "ssh-connections": "0"})


def test_udp_is_on_by_default_only_for_upstreams_said_to_carry_it_and_in_tproxy_mode():
    plain = Config.from_values({"upstream": "socks5://h:1", "mode": "tproxy"})
    assert plain.udp_upstreams == []  # ssh -D looks the same: nothing says it carries UDP
    marked = {"upstream": ["http://p:3128", {"url": "socks5://h:1", "udp": "on"}], "mode": "tproxy"}
    assert [str(u) for u in Config.from_values(marked).udp_upstreams] == ["socks5://h:1"]
    assert Config.from_values({**marked, "mode": "redirect"}).udp_upstreams == []  # default: off, no error
    assert Config.from_values({**marked, "udp": "off"}).udp_upstreams == []
    every = Config.from_values({"upstream": ["socks5://a:1", "socks5://b:1"], "mode": "tproxy", "udp": "on"})
    assert [u.host for u in every.udp_upstreams] == ["a", "b"]


@pytest.mark.parametrize(
    "values,message",
    [
        ({"upstream": "socks5://h:1", "udp": "on"}, "udp on needs mode tproxy"),
        ({"upstream": "http://h:1", "mode": "tproxy", "udp": "on"}, "needs a SOCKS5 upstream"),
        ({"upstream": "socks5://h:1", "mode": "tproxy", "udp": "on", "workers": "2"}, "needs workers 1"),
        ({"upstream": "socks5://h:1", "mode": "tproxy", "udp": "on", "ssh": "far"}, "ssh -D carries no UDP"),
        ({"upstream": {"url": "http://h:1", "udp": "on"}}, "udp is for SOCKS5 proxies"),
        ({"upstream": {"url": "socks5://h:1", "udp": "maybe"}}, "is not on or off"),
    ],
)
def test_udp_that_cannot_work_is_a_config_error(values, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_values(values)


def test_https_upstreams_take_the_tls_settings_and_speak_http():
    ca = __file__  # any readable file: its contents are loaded by relay.net.tls, not here
    config = parse(
        ["--upstream", "https://user:pw@10.0.0.1:8443", "--upstream", "http://10.0.0.2:3128",
         "--upstream-ca", ca, "--upstream-sni", "Proxy.Example."]
    )  # fmt: skip
    https, http = config.upstreams
    assert str(https) == "https://user:***@10.0.0.1:8443" and https.protocol == "http"
    assert https.tls.ca == ca and https.server_name == "proxy.example"
    assert http.tls is None and config.early_data_for(https) == "auto"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--upstream", "http://p:3128", "--upstream-ca", __file__], "--upstream-ca: no upstream is https://"),
        (["--upstream", "https://p:443", "--upstream-key", __file__], "--upstream-key needs --upstream-cert"),
        (["--upstream", "https://p:443", "--upstream-ca", "/nonexistent/ca.pem"], "no such readable file"),
        (["--upstream", "https://p:443", "--upstream-sni", "not a name"], "not a host name or an IP address"),
    ],
)
def test_bad_tls_settings_are_refused(args, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(args)


def parse(args):
    return load_config(build_parser().parse_args(args))
