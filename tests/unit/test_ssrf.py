"""The webhook SSRF guard: refused ranges, literal spellings, allowlists and DNS answers."""

from __future__ import annotations

import ipaddress
import pickle
import socket
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from chatjobs.ssrf import (
    Target,
    WebhookResolveError,
    WebhookUrlRefused,
    check_literal,
    is_refused,
    parse_allowlist,
    parse_host,
    resolve,
)

REFUSED = [
    # IPv4
    "0.0.0.0",
    "0.255.255.255",
    "10.0.0.1",
    "10.255.255.255",
    "100.64.0.1",
    "100.127.255.254",
    "127.0.0.1",
    "127.255.255.254",
    "169.254.0.1",
    "169.254.169.254",
    "172.16.0.1",
    "172.31.255.255",
    "192.0.0.8",
    "192.0.2.1",
    "192.168.0.1",
    "192.168.255.255",
    "198.18.0.1",
    "198.51.100.7",
    "203.0.113.7",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    # IPv6
    "::",
    "::1",
    "fe80::1",
    "febf:ffff::1",
    "fc00::1",
    "fd12:3456:789a::1",
    "fd00:ec2::254",
    "fec0::1",
    "ff02::1",
    "ff0e::101",
    "100::1",
    "2001:db8::1",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",
    "64:ff9b:1::a00:1",
    "::ffff:0:7f00:1",
    # IPv6 with a refused IPv4 address inside
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "::ffff:0.0.0.0",
    "::127.0.0.1",
    "::10.0.0.1",
    "64:ff9b::127.0.0.1",
    "64:ff9b::169.254.169.254",
    "2002:7f00:1::1",
    "2002:a00:1::",
    "2002:c0a8:101::1",
]
ALLOWED = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "2606:4700:4700::1111",
    "2a00:1450:4001:82a::200e",
    "::ffff:8.8.8.8",
    "64:ff9b::8.8.8.8",
    "2002:808:808::1",
]

SPELLINGS = {
    "127.0.0.1": [
        "127.0.0.1",
        "2130706433",
        "0x7f000001",
        "0X7F000001",
        "0x7f.0.0.1",
        "0x7f.0x0.0x0.0x1",
        "0177.0.0.1",
        "0177.0000.0000.0001",
        "017700000001",
        "127.1",
        "127.0.1",
        "127.0.0.1.",
        "0x7f.1.",
        "%31%32%37.0.0.1",
        "\uff11\uff12\uff17\uff0e\uff10\uff0e\uff10\uff0e\uff11",  # full-width 127.0.0.1
        "127\u30020\u30020\u30021",  # ideographic full stops
    ],
    "10.0.0.1": ["10.0.0.1", "167772161", "0xa000001", "0xa.0.0.1", "012.0.0.1", "10.1", "10.0.1"],
    "169.254.169.254": [
        "169.254.169.254",
        "2852039166",
        "0xa9fea9fe",
        "0xa9.0xfe.0xa9.0xfe",
        "0251.0376.0251.0376",
        "025177524776",
        "169.254.43518",
        "169.16689662",
    ],
    "0.0.0.0": ["0.0.0.0", "0", "0x0", "00000", "0.0"],
}
SPELLING_CASES = [(spelling, ip) for ip, spellings in SPELLINGS.items() for spelling in spellings]

V6_LITERALS = {
    "[::1]": "::1",
    "[0:0:0:0:0:0:0:1]": "::1",
    "[::ffff:127.0.0.1]": "::ffff:7f00:1",
    "[::ffff:7f00:1]": "::ffff:7f00:1",
    "[::ffff:a9fe:a9fe]": "::ffff:169.254.169.254",
    "[fe80::1%25eth0]": "fe80::1",
    "[FE80::1%eth0]": "fe80::1",
    "[::]": "::",
}

NO_ALLOW: tuple[Any, ...] = ()


def fake_resolver(
    answers: dict[str, Sequence[str]], calls: list[tuple[Any, ...]] | None = None
) -> Callable[..., list[Any]]:
    """A getaddrinfo stand-in answering from a table; records its calls."""

    def getaddrinfo(host: str, port: int, family: int = 0, type: int = 0) -> list[Any]:
        if calls is not None:
            calls.append((host, port, family, type))
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        result: list[Any] = []
        for ip in answers[host]:
            if ":" in ip:
                result.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0)))
            else:
                result.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)))
        return result

    return getaddrinfo


# --- is_refused -----------------------------------------------------------------------


@pytest.mark.parametrize("address", REFUSED)
def test_internal_and_reserved_addresses_are_refused(address: str) -> None:
    assert is_refused(ipaddress.ip_address(address), NO_ALLOW) is not None


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address: str) -> None:
    assert is_refused(ipaddress.ip_address(address), NO_ALLOW) is None


@pytest.mark.parametrize(
    "address", ["169.254.169.254", "::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe", "fd00:ec2::254"]
)
def test_cloud_metadata_addresses_are_named_as_such(address: str) -> None:
    assert "metadata" in (is_refused(ipaddress.ip_address(address), NO_ALLOW) or "")


def test_mapped_address_reason_names_the_embedded_address() -> None:
    reason = is_refused(ipaddress.ip_address("::ffff:127.0.0.1"), NO_ALLOW)
    assert reason is not None and "127.0.0.1 is loopback" in reason


def test_allowlist_lets_its_networks_through_and_nothing_else() -> None:
    allow = parse_allowlist("127.0.0.0/8")
    assert is_refused(ipaddress.ip_address("127.0.0.1"), allow) is None
    assert is_refused(ipaddress.ip_address("::ffff:127.0.0.1"), allow) is None
    assert is_refused(ipaddress.ip_address("10.0.0.1"), allow) is not None
    assert is_refused(ipaddress.ip_address("::1"), allow) is not None
    check_literal("http://127.0.0.1:8080/hook", allow)
    check_literal("http://0x7f.1/hook", allow)
    with pytest.raises(WebhookUrlRefused):
        check_literal("http://10.0.0.1/hook", allow)


# --- parse_allowlist ------------------------------------------------------------------


def test_allowlist_parses_comma_separated_cidrs_and_bare_ips() -> None:
    nets = parse_allowlist(" 127.0.0.0/8, ::1/128 ,10.1.2.3,,fd00::1 ")
    assert nets == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("10.1.2.3/32"),
        ipaddress.ip_network("fd00::1/128"),
    )
    assert parse_allowlist(["192.168.0.0/16"]) == (ipaddress.ip_network("192.168.0.0/16"),)
    assert parse_allowlist(None) == ()
    assert parse_allowlist("") == ()


@pytest.mark.parametrize("entry", ["localhost", "127.0.0.0/33", "10.0.0.1/8", "1.2.3", "[::1]"])
def test_allowlist_bad_entry_is_named_in_the_error(entry: str) -> None:
    with pytest.raises(ValueError, match=repr(entry).replace("[", r"\[").replace("]", r"\]")):
        parse_allowlist(f"127.0.0.0/8,{entry}")


# --- parse_host and check_literal -----------------------------------------------------


@pytest.mark.parametrize(("spelling", "expected"), SPELLING_CASES)
def test_every_ipv4_spelling_is_recognised(spelling: str, expected: str) -> None:
    assert parse_host(spelling) == ipaddress.IPv4Address(expected)


@pytest.mark.parametrize(("spelling", "expected"), SPELLING_CASES)
def test_every_ipv4_spelling_of_an_internal_address_is_refused(
    spelling: str, expected: str
) -> None:
    with pytest.raises(WebhookUrlRefused, match=expected.replace(".", r"\.")):
        check_literal(f"http://{spelling}:8080/hook", NO_ALLOW)


@pytest.mark.parametrize(("literal", "expected"), V6_LITERALS.items())
def test_bracketed_ipv6_literals_are_recognised_and_refused(literal: str, expected: str) -> None:
    assert parse_host(literal) == ipaddress.IPv6Address(expected)
    with pytest.raises(WebhookUrlRefused):
        check_literal(f"https://{literal}/hook", NO_ALLOW)


@pytest.mark.parametrize(
    "host", ["example.com", "localhost", "hooks.example.com.", "deadbeef", "xn--bcher-kva.example"]
)
def test_hostnames_are_not_literals(host: str) -> None:
    assert parse_host(host) is None


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/hook",
        "https://hooks.example.com:8443/a/b?token=x&y=1",
        "https://localhost/hook",  # a name: judged after DNS, at delivery
        "http://8.8.8.8/",
        "http://[2606:4700:4700::1111]:8080/",
        "https://b\u00fccher.example/",
        "http://0x08080808/",
    ],
)
def test_public_literals_and_hostnames_pass_the_submission_check(url: str) -> None:
    check_literal(url, NO_ALLOW)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/file",
        "file:///etc/passwd",
        "gopher://example.com:70/",
        "javascript:alert(1)",
        "example.com/hook",
        "http:///hook",
        "http://:8080/hook",
        "http://user:pass@example.com/hook",
        "http://user@example.com/hook",
        "http://example.com\\@127.0.0.1/",
        "http://example.com:99999/",
        "http://example.com:0/",
        "http://exa mple.com/",
        "http://example.com/\r\nX-Injected: 1",
        "http://[::1/",
        "http://[127.0.0.1]/",
        "http://1.2.3.4.5/",
        "http://256.0.0.1/",
        "http://exa%6dple.com/",
    ],
)
def test_submission_check_refuses_bad_urls(url: str) -> None:
    with pytest.raises(WebhookUrlRefused):
        check_literal(url, NO_ALLOW)


def test_refusal_message_leaves_out_the_url_token() -> None:
    with pytest.raises(WebhookUrlRefused) as info:
        check_literal("http://127.0.0.1/hook?token=s3cret", NO_ALLOW)
    assert "s3cret" not in str(info.value)


def test_refusal_is_a_value_error_and_pickles() -> None:
    err = WebhookUrlRefused("127.0.0.1 is loopback (127.0.0.0/8)")
    assert isinstance(err, ValueError)
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is WebhookUrlRefused and str(copy) == str(err)


# --- resolve --------------------------------------------------------------------------


def test_hostname_resolving_to_loopback_is_refused() -> None:
    resolver = fake_resolver({"internal.example": ["127.0.0.1"]})
    with pytest.raises(WebhookUrlRefused, match=r"internal\.example resolves to 127\.0\.0\.1"):
        resolve("https://internal.example/hook", NO_ALLOW, resolver=resolver)


def test_localhost_with_trailing_dot_is_refused_after_resolution() -> None:
    check_literal("http://localhost./hook", NO_ALLOW)
    resolver = fake_resolver({"localhost.": ["127.0.0.1", "::1"]})
    with pytest.raises(WebhookUrlRefused, match="loopback"):
        resolve("http://localhost./hook", NO_ALLOW, resolver=resolver)


@pytest.mark.parametrize(
    "answers",
    [
        ["93.184.216.34", "10.0.0.1"],
        ["10.0.0.1", "93.184.216.34"],
        ["2606:2800:220:1:248:1893:25c8:1946", "::1"],
        ["93.184.216.34", "::ffff:169.254.169.254"],
    ],
)
def test_hostname_with_any_internal_answer_is_refused(answers: list[str]) -> None:
    resolver = fake_resolver({"mixed.example": answers})
    with pytest.raises(WebhookUrlRefused):
        resolve("https://mixed.example/hook", NO_ALLOW, resolver=resolver)


def test_public_hostname_resolves_once_to_its_first_address() -> None:
    calls: list[tuple[Any, ...]] = []
    resolver = fake_resolver(
        {"hooks.example": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]}, calls
    )
    target = resolve("https://Hooks.Example:8443/in?x=1#frag", NO_ALLOW, resolver=resolver)
    assert target == Target("https", "hooks.example", 8443, "93.184.216.34", "/in?x=1")
    assert calls == [("hooks.example", 8443, socket.AF_UNSPEC, socket.SOCK_STREAM)]
    assert target.host_header == "hooks.example:8443"
    assert target.url == "https://93.184.216.34:8443/in?x=1"


def test_default_port_is_left_out_of_the_host_header() -> None:
    resolver = fake_resolver({"hooks.example": ["2606:2800:220:1:248:1893:25c8:1946"]})
    target = resolve("https://hooks.example", NO_ALLOW, resolver=resolver)
    assert target.port == 443 and target.path_qs == "/"
    assert target.host_header == "hooks.example"
    assert target.url == "https://[2606:2800:220:1:248:1893:25c8:1946]:443/"


def test_ip_literal_url_is_not_looked_up() -> None:
    calls: list[tuple[Any, ...]] = []
    allow = parse_allowlist("127.0.0.0/8")
    target = resolve("http://2130706433:9000/x", allow, resolver=fake_resolver({}, calls))
    assert (target.ip, target.host, target.port) == ("127.0.0.1", "127.0.0.1", 9000)
    assert calls == []


def test_allowlisted_hostname_resolves() -> None:
    resolver = fake_resolver({"receiver.test": ["127.0.0.1"]})
    target = resolve(
        "http://receiver.test:8080/", parse_allowlist("127.0.0.0/8"), resolver=resolver
    )
    assert target.ip == "127.0.0.1"


def test_unresolvable_host_is_a_resolve_error_not_a_refusal() -> None:
    with pytest.raises(WebhookResolveError):
        resolve("https://nowhere.example/", NO_ALLOW, resolver=fake_resolver({}))
    with pytest.raises(WebhookResolveError):
        resolve("https://empty.example/", NO_ALLOW, resolver=fake_resolver({"empty.example": []}))
