"""Which webhook URLs chatjobs may call: the guard against server-side request forgery.

Webhook URLs come from clients, so every one is untrusted. Two checks, one rule set:

* ``check_literal`` at job submission refuses what is wrong on its face: a scheme other than
  http/https, no host, credentials in the URL, or a host that is an IP literal in a refused
  range, in any spelling a client or resolver would accept (``2130706433``, ``0x7f.1``,
  ``0177.0.0.1``, ``127.1``, ``[::ffff:127.0.0.1]``, full-width digits ...).
* ``resolve`` at delivery resolves the host once, refuses if *any* answer is refused, and
  returns the one address the caller must connect to, so no second lookup can differ.

Refused, unless inside an allowlisted network (``CHATJOBS_WEBHOOK_ALLOW_PRIVATE``):

* IPv4: 0.0.0.0/8, 10/8, 100.64/10 (CGNAT), 127/8, 169.254/16 (link-local; 169.254.169.254,
  169.254.170.2 and 100.100.100.200 are named as cloud metadata), 172.16/12, 192.0.0/24,
  192.0.2/24, 192.88.99/24, 192.168/16, 198.18/15, 198.51.100/24, 203.0.113/24, 224/4
  (multicast), 240/4 (reserved) and 255.255.255.255 (broadcast).
* IPv6: ::, ::1, fc00::/7 (unique-local; fd00:ec2::254 named as metadata), fe80::/10,
  fec0::/10, ff00::/8, 100::/64, 2001::/32 (Teredo), 2001:db8::/32, 64:ff9b:1::/48 and
  ::ffff:0:0:0/96 (IPv4-translated).
* IPv6 that embeds an IPv4 address is judged by the embedded address: IPv4-mapped
  (::ffff:0:0/96), IPv4-compatible (::/96), NAT64 (64:ff9b::/96) and 6to4 (2002::/16).
* Anything else Python's ``ipaddress`` does not call globally routable.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import idna

from chatjobs.errors import ChatJobsError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Allowlist = Sequence[IPNetwork]
Resolver = Callable[[str, int, int, int], Sequence[tuple[Any, Any, Any, Any, tuple[Any, ...]]]]


class WebhookTargetError(ChatJobsError):
    """A webhook URL cannot be delivered to."""


class WebhookUrlRefused(WebhookTargetError, ValueError):
    """The webhook URL, or an address its host resolves to, may not be called.

    A ValueError too, so a pydantic validator that raises it becomes a 422. The message names
    the host and address, never the whole URL: webhook URLs often carry tokens.
    """


class WebhookResolveError(WebhookTargetError):
    """The webhook host did not resolve to any address."""


@dataclass(frozen=True)
class Target:
    """A checked webhook destination: connect to ``ip``, speak to ``host``."""

    scheme: str
    host: str
    port: int
    ip: str
    path_qs: str

    @property
    def host_header(self) -> str:
        """The Host header: the URL's host, with the port unless it is the scheme's default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The URL to request: the checked IP in place of the host."""
        ip = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{self.scheme}://{ip}:{self.port}{self.path_qs}"

    @property
    def host_is_ip(self) -> bool:
        """Whether the URL named an IP literal (then there is no name for TLS SNI)."""
        return parse_host(self.host) is not None


_DEFAULT_PORTS = {"http": 80, "https": 443}

_METADATA = "a cloud metadata endpoint"
_V4_RULES: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(net), label)
    for net, label in (
        # The specific names come first so the reason says "metadata", not "link-local".
        ("169.254.169.254/32", _METADATA),
        ("169.254.170.2/32", _METADATA + " (ECS task)"),
        ("100.100.100.200/32", _METADATA + " (Alibaba)"),
        ("255.255.255.255/32", "broadcast"),
        ("0.0.0.0/8", "unspecified (0.0.0.0/8)"),
        ("10.0.0.0/8", "private (10.0.0.0/8)"),
        ("100.64.0.0/10", "carrier-grade NAT (100.64.0.0/10)"),
        ("127.0.0.0/8", "loopback (127.0.0.0/8)"),
        ("169.254.0.0/16", "link-local (169.254.0.0/16)"),
        ("172.16.0.0/12", "private (172.16.0.0/12)"),
        ("192.0.0.0/24", "IETF protocol assignments (192.0.0.0/24)"),
        ("192.0.2.0/24", "documentation (192.0.2.0/24)"),
        ("192.88.99.0/24", "6to4 relay anycast (192.88.99.0/24)"),
        ("192.168.0.0/16", "private (192.168.0.0/16)"),
        ("198.18.0.0/15", "benchmarking (198.18.0.0/15)"),
        ("198.51.100.0/24", "documentation (198.51.100.0/24)"),
        ("203.0.113.0/24", "documentation (203.0.113.0/24)"),
        ("224.0.0.0/4", "multicast (224.0.0.0/4)"),
        ("240.0.0.0/4", "reserved (240.0.0.0/4)"),
    )
)
_V6_RULES: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(net), label)
    for net, label in (
        ("::/128", "unspecified (::)"),
        ("::1/128", "loopback (::1)"),
        ("fd00:ec2::254/128", _METADATA + " (AWS, IPv6)"),
        ("::ffff:0:0:0/96", "IPv4-translated (::ffff:0:0:0/96)"),
        ("64:ff9b:1::/48", "local-use NAT64 (64:ff9b:1::/48)"),
        ("100::/64", "discard-only (100::/64)"),
        ("2001::/32", "Teredo (2001::/32)"),
        ("2001:db8::/32", "documentation (2001:db8::/32)"),
        ("fc00::/7", "unique-local (fc00::/7)"),
        ("fe80::/10", "link-local (fe80::/10)"),
        ("fec0::/10", "site-local (fec0::/10)"),
        ("ff00::/8", "multicast (ff00::/8)"),
    )
)
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_COMPATIBLE = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")

# What inet_aton's legacy forms are made of; its glibc version also accepts "127.1 junk",
# which no URL host can be, so anything else is not treated as a literal.
_V4_LEGACY = re.compile(r"[0-9a-fx.]+", re.IGNORECASE)
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}\.?")
# A host whose last label is a number is an IPv4 address or nothing (as browsers rule).
_NUMERIC_LAST_LABEL = re.compile(r"(?:^|\.)(?:[0-9]+|0x[0-9a-f]*)\.?$", re.IGNORECASE)


def parse_allowlist(spec: str | Sequence[str] | None) -> tuple[IPNetwork, ...]:
    """Networks from a comma-separated string or a list of CIDRs; a bare IP is a single host.

    Host bits set (``10.0.0.1/8``) are an error rather than silently widened.
    """
    if spec is None:
        return ()
    entries = spec.split(",") if isinstance(spec, str) else spec
    networks: list[IPNetwork] = []
    for entry in entries:
        text = entry.strip()
        if not text:
            continue
        try:
            networks.append(ipaddress.ip_network(text))
        except ValueError as exc:
            raise ValueError(f"webhook allowlist entry {text!r} is not a network: {exc}") from exc
    return tuple(networks)


def is_refused(ip: IPAddress, allow: Allowlist) -> str | None:
    """Why an address may not be called, or None if it may."""
    if any(ip in network for network in allow):
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_v4(ip)
        if embedded is not None:
            reason = is_refused(embedded, allow)
            return None if reason is None else f"{ip} embeds IPv4 {embedded}: {reason}"
        rules: Sequence[tuple[IPNetwork, str]] = _V6_RULES
    else:
        rules = _V4_RULES
    for network, label in rules:
        if ip in network:
            return f"{ip} is {label}"
    if not ip.is_global:
        return f"{ip} is not globally routable"
    return None


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    # Each of these reaches the embedded IPv4 address on some stack: mapped on dual-stack
    # sockets, NAT64 through a translator, 6to4 through a relay, compatible on old kernels.
    if ip in _MAPPED or ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _COMPATIBLE and int(ip) > 1:  # :: and ::1 are themselves, not 0.0.0.0/0.0.0.1
        return ipaddress.IPv4Address(int(ip))
    if ip in _SIX_TO_FOUR:
        return ip.sixtofour
    return None


def parse_host(host: str) -> IPAddress | None:
    """The address a URL host denotes if it is an IP literal in any accepted spelling, else None.

    Recognises dotted quads and inet_aton's legacy forms (``2130706433``, ``0x7f000001``,
    ``0x7f.0.0.1``, ``0177.0.0.1``, ``127.1``), trailing dots, percent-encoding, full-width
    digits and ideographic dots, and IPv6 with or without brackets and zone id (``%25eth0``).
    """
    text = host
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        # The zone id only picks an interface; "%25" is how a URL spells the "%".
        try:
            return ipaddress.IPv6Address(text.split("%", 1)[0])
        except ValueError:
            return None
    text = _ascii_host(unquote(text)) or ""
    text = text.rstrip(".")
    if not _V4_LEGACY.fullmatch(text):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        return None


def _ascii_host(host: str) -> str | None:
    # UTS 46 mapping, as browsers apply it: full-width digits and dots become 127.0.0.1.
    if host.isascii():
        return host.lower()
    try:
        return idna.encode(host, uts46=True).decode("ascii")
    except idna.IDNAError:
        return None


@dataclass(frozen=True)
class _Parts:
    scheme: str
    host: str
    port: int
    ip: IPAddress | None
    path_qs: str


def _split(url: str) -> _Parts:
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise WebhookUrlRefused("webhook URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookUrlRefused(f"webhook URL is malformed: {exc}") from exc
    if not parts.scheme:
        raise WebhookUrlRefused("webhook URL has no scheme (use http:// or https://)")
    if parts.scheme not in _DEFAULT_PORTS:
        raise WebhookUrlRefused(f"webhook URL scheme {parts.scheme!r} is not http or https")
    # Besides leaking credentials, userinfo is where parser confusions live ("a\@b", "a@b@c").
    if "@" in parts.netloc:
        raise WebhookUrlRefused("webhook URL may not contain credentials (user:pass@)")
    if not parts.hostname:
        raise WebhookUrlRefused("webhook URL has no host")
    if port == 0:
        raise WebhookUrlRefused("webhook URL port 0 is not valid")
    ip = parse_host(parts.hostname)
    if ip is not None:
        host = str(ip)
    else:
        host = _ascii_host(parts.hostname) or ""
        if ":" in parts.hostname or not _HOSTNAME.fullmatch(host) or len(host) > 254:
            raise WebhookUrlRefused(f"webhook URL host {parts.hostname!r} is not valid")
        if _NUMERIC_LAST_LABEL.search(host):
            raise WebhookUrlRefused(f"webhook URL host {host!r} is not a valid IPv4 address")
    query = f"?{parts.query}" if parts.query else ""
    return _Parts(
        scheme=parts.scheme,
        host=host,
        port=port or _DEFAULT_PORTS[parts.scheme],
        ip=ip,
        path_qs=(parts.path or "/") + query,
    )


def check_literal(url: str, allow: Allowlist) -> None:
    """Refuse a webhook URL that is wrong on its face; hostnames are judged at delivery.

    Raises WebhookUrlRefused for a scheme other than http/https, a missing host, credentials in
    the URL, an invalid host, or an IP literal (any spelling) in a refused range.
    """
    parts = _split(url)
    if parts.ip is not None and (reason := is_refused(parts.ip, allow)):
        raise WebhookUrlRefused(reason)


def resolve(url: str, allow: Allowlist, *, resolver: Resolver = socket.getaddrinfo) -> Target:
    """Check a webhook URL and resolve its host once, returning the address to connect to.

    Every answer must pass, not just the one used: a name that resolves to a public and a
    private address (or answers differently from one lookup to the next: DNS rebinding) must
    not get a foot in the internal network, whichever answer a later connection would pick.
    The caller connects to ``Target.ip`` and never looks the name up again.

    Raises WebhookUrlRefused, or WebhookResolveError if the name has no usable address.
    """
    parts = _split(url)
    if parts.ip is not None:
        if reason := is_refused(parts.ip, allow):
            raise WebhookUrlRefused(reason)
        return Target(parts.scheme, parts.host, parts.port, str(parts.ip), parts.path_qs)
    try:
        answers = resolver(parts.host, parts.port, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise WebhookResolveError(f"could not resolve {parts.host}: {exc}") from exc
    addresses: list[IPAddress] = []
    for family, _type, _proto, _canon, sockaddr in answers:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        # A link-local answer carries its zone ("fe80::1%eth0"); the address is what counts.
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if reason := is_refused(ip, allow):
            raise WebhookUrlRefused(f"{parts.host} resolves to {reason}")
        addresses.append(ip)
    if not addresses:
        raise WebhookResolveError(f"could not resolve {parts.host}: no addresses")
    return Target(parts.scheme, parts.host, parts.port, str(addresses[0]), parts.path_qs)
