"""Where a webhook may go: an http(s) URL whose host resolves only to public addresses.

The check runs when a job is created and again before every attempt, and the attempt
connects to the address that this check resolved (`Destination.address`), never to a
second lookup: a name that answers a public address to the check and a private one to the
connection (DNS rebinding) still reaches the public one. An operator opens hosts or
networks that are not public (an internal receiver) with BIT_WEBHOOK_ALLOW.

Python's `is_global` is the base, with explicit checks where it is too lenient (this
Python's tables predate some registry changes) or where an address embeds an IPv4 one that
the connection would reach: IPv4-mapped (::ffff:a.b.c.d), 6to4 (2002::/16) and NAT64
(64:ff9b::/96).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SCHEMES = {"http": 80, "https": 443}
ALLOW_HINT = (
    "an operator can allow a host or network with BIT_WEBHOOK_ALLOW (comma-separated "
    "hostnames, addresses or CIDR networks)"
)

# Ranges refused by name before the generic tests, so the message says what the range is.
NAMED_RANGES: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(network), what)
    for network, what in (
        ("0.0.0.0/8", "'this network' (connecting there reaches this host)"),
        ("169.254.169.254/32", "the cloud metadata address"),
        ("fd00:ec2::254/128", "the cloud metadata address (IPv6)"),
        ("168.63.129.16/32", "a cloud platform's host service address"),
        ("100.64.0.0/10", "shared address space (carrier-grade NAT)"),
        ("192.0.0.0/24", "IETF protocol assignments (one is a cloud metadata address)"),
        ("192.88.99.0/24", "the deprecated 6to4 relay range"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("2001::/32", "Teredo"),
    )
)
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class DestinationRefused(ValueError):
    """A callback URL this server will not send to; the message says why."""


@dataclass(frozen=True)
class AllowList:
    """BIT_WEBHOOK_ALLOW, parsed: hostnames that are allowed whatever they resolve to, and
    networks whose addresses are allowed though not public."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, text: str) -> AllowList:
        """Comma-separated hostnames, IP addresses and CIDR networks; ValueError on junk."""
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
                continue
            except ValueError:
                pass
            name = item.lower().rstrip(".")
            if not name or any(c in name for c in "/:@ *") or name.startswith("-"):
                raise ValueError(
                    f"BIT_WEBHOOK_ALLOW: {item!r} is neither a hostname, an IP address nor a "
                    "CIDR network (e.g. hooks.internal, 10.0.0.5, 10.1.0.0/16)"
                )
            hosts.add(name)
        return cls(frozenset(hosts), tuple(networks))

    def covers(self, address: IPAddress) -> bool:
        candidates = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            candidates.append(address.ipv4_mapped)
        return any(a in network for a in candidates for network in self.networks)


@dataclass(frozen=True)
class Destination:
    """A checked callback: the URL, its host and port, and the address to connect to."""

    url: str
    scheme: str
    host: str
    port: int
    address: str  # the resolved address the connection is pinned to


def refusal(address: IPAddress) -> str | None:
    """Why `address` is not a public destination, or None if it is."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            inner = refusal(embedded)
            if inner is not None:
                return f"an address embedding {embedded}, which is {inner}"
            if address.ipv4_mapped:
                return None  # the connection goes to that public IPv4 address
    for network, what in NAMED_RANGES:
        if address in network:
            return what
    checks: tuple[tuple[bool, str], ...] = (
        (address.is_unspecified, "unspecified"),
        (address.is_loopback, "loopback"),
        (address.is_link_local, "link-local (where cloud metadata services live)"),
        (address.is_multicast, "multicast"),
        (address.is_private, "a private network"),
        (address.is_reserved, "reserved"),
        (isinstance(address, ipaddress.IPv6Address) and address.is_site_local, "site-local"),
        (not address.is_global, "not globally routable"),
    )
    return next((what for refused, what in checks if refused), None)


Resolver = Callable[[str, int], list[IPAddress]]


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (an IP literal resolves to itself)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found: list[IPAddress] = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    return found


def check_destination(
    url: str, allow: AllowList, *, resolver: Resolver | None = None
) -> Destination:
    """The destination of `url` with the address to pin; DestinationRefused if the scheme is
    not http(s), the host does not resolve, or any address it resolves to is not public
    (and not allowed). Every address is checked: the connection could use any of them."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise DestinationRefused(f"the URL does not parse ({exc})") from exc
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise DestinationRefused(f"the scheme must be http or https, not {scheme or 'none'!r}")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise DestinationRefused("the URL has no host")
    port = port or SCHEMES[scheme]
    try:
        addresses = (resolver or resolve)(host, port)
    except (OSError, UnicodeError, ValueError) as exc:
        raise DestinationRefused(f"the host {host!r} does not resolve ({exc})") from exc
    if not addresses:
        raise DestinationRefused(f"the host {host!r} does not resolve to any address")
    if host not in allow.hosts:
        for address in addresses:
            why = None if allow.covers(address) else refusal(address)
            if why is not None:
                shown = host if host == str(address) else f"{host} resolves to {address}, which"
                raise DestinationRefused(f"{shown} is {why}; {ALLOW_HINT}")
    return Destination(url, scheme, host, port, str(addresses[0]))
