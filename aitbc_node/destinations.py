"""Where webhooks may be sent: the destination policy that keeps clients off the node's network.

A webhook URL is chosen by a client, and the node is the one that connects to it, so without a
rule a client could make the node reach what only the node can reach: its own loopback
services, the private network around it, a cloud metadata service. The rule: a destination
must be a globally routable unicast address. Loopback, private, link-local, multicast,
unspecified, reserved, shared (CGNAT) and unique-local addresses are refused, in every spelling
a resolver accepts (`2130706433`, `0x7f000001`, `127.1`, `0`, octal parts, IPv4-mapped and 6to4
IPv6), unless the operator allows them with `--webhook-allow CIDR|HOST`.

A host name is resolved and each of its addresses checked; the node connects only to an address
that passed (`Destination.address`), so a name cannot be re-pointed between the check and the
connection. A name that does not resolve to an allowed address is refused; the refusal does not
say what it resolved to, so registration is no oracle for the node's internal DNS.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

HINT = "the operator can allow it with --webhook-allow"

# Names that mean the node itself or its cloud's metadata service whatever DNS says: refused
# without asking a resolver (`localhost` always means loopback, RFC 6761).
LOOPBACK_NAMES = ("localhost",)
METADATA_NAMES = frozenset({"metadata.google.internal", "metadata.goog", "metadata"})

_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")
_PRIVATE = tuple(
    ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
)
_UNIQUE_LOCAL = ipaddress.IPv6Network("fc00::/7")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class NotAllowed(Exception):
    """The destination is refused; the message says which rule refused it."""


@dataclass(frozen=True)
class Destination:
    """A checked destination: the URL's host (for `Host` and TLS) and the address to dial."""

    host: str
    address: IPAddress


def parse_ipv4(text: str) -> ipaddress.IPv4Address | None:
    """`text` read as an IPv4 address the way `inet_aton` reads it, or None.

    One to four dot-separated parts, each decimal, octal (a leading 0) or hex (0x); the last
    part fills the remaining bytes, so `127.1`, `2130706433`, `0x7f000001`, `0177.0.0.1` and
    `0` are all addresses.
    """
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = []
    for part in parts:
        lower = part.lower()
        if lower.startswith("0x"):
            digits, base = lower[2:], 16
            ok = bool(digits) and all(c in "0123456789abcdef" for c in digits)
        elif len(part) > 1 and part.startswith("0"):
            digits, base = part[1:], 8
            ok = all(c in "01234567" for c in digits)
        else:
            digits, base = part, 10
            ok = bool(digits) and all(c in "0123456789" for c in digits)
        if not ok:
            return None
        values.append(int(digits, base))
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    number = last
    for i, value in enumerate(head):
        number |= value << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def parse_ip(host: str) -> IPAddress | None:
    """The address a URL host names literally (IPv6 without brackets, any IPv4 spelling)."""
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host.replace("%25", "%"))
        except ValueError:
            raise NotAllowed(f"{host} is not a valid IPv6 address") from None
    return parse_ipv4(host)


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (v4-mapped, 6to4, NAT64), if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def refusal(address: IPAddress) -> str | None:
    """What kind of address this is when it must not be a destination ("a loopback address"),
    or None when it is a globally routable unicast address."""
    inner = embedded_ipv4(address)
    if inner is not None:
        kind = refusal(inner)
        return f"{kind} (it embeds {inner})" if kind else None
    if address.is_unspecified or address in _THIS_NETWORK:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address in _SHARED:
        return "a shared (CGNAT) address"
    if address in _UNIQUE_LOCAL:
        return "a unique-local address"
    if any(address in net for net in _PRIVATE):
        return "a private address"
    if address.is_reserved:
        return "a reserved address"
    if address.is_private or not address.is_global:
        return "not a globally routable address"
    return None


def normalise_host(host: str) -> str:
    """A URL host as compared and sent: lower case, no trailing dot, IDNA-encoded."""
    host = host.lower().rstrip(".")
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        raise NotAllowed(f"{host} is not a valid host name") from None


def parse_allow(entry: str) -> IPNetwork | str:
    """One `--webhook-allow` value: a network (`10.0.0.0/8`, `127.0.0.1`, `::1`) or a host name."""
    text = entry.strip()
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        pass
    name = text.lower().rstrip(".")
    labels = name.split(".")
    if not name or not all(
        label and len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
        for label in labels
    ):
        raise ValueError(f"{entry!r} is neither a network (CIDR) nor a host name")
    return name


class DestinationPolicy:
    """The rule for webhook destinations, with the operator's allow-list."""

    def __init__(self, allow: Iterable[str] = ()) -> None:
        """`allow`: `--webhook-allow` values; raises ValueError on one that is not valid."""
        entries = [parse_allow(a) for a in allow]
        self.networks = [e for e in entries if not isinstance(e, str)]
        self.hosts = frozenset(e for e in entries if isinstance(e, str))

    def _allowed(self, address: IPAddress) -> bool:
        inner = embedded_ipv4(address)
        return any(
            a in net for net in self.networks for a in (address, inner) if a is not None
        ) or (refusal(address) is None)

    def check(self, host: str, port: int, *, resolve: bool = True) -> Destination | None:
        """The destination to connect to for a URL's `host` and `port`; NotAllowed if refused.

        With `resolve=False` (registration) a host name the operator allowed by name is taken
        as it is and None returned; delivery resolves it then.
        """
        name = normalise_host(host)
        literal = parse_ip(name)
        if literal is not None:
            kind = None if self._allowed(literal) else refusal(literal)
            if kind is not None:
                # "2130706433 is 127.0.0.1, ...": say what an unusual IPv4 spelling means.
                spelled = "" if str(literal) == name or ":" in name else f"{literal}, "
                raise NotAllowed(f"{host} is {spelled}{kind}; {HINT}")
            if isinstance(literal, ipaddress.IPv6Address) and literal.ipv4_mapped:
                literal = literal.ipv4_mapped  # dial what it means: not every socket maps
            return Destination(name, literal)
        if name in self.hosts:
            return Destination(name, _resolve(name, port)[0]) if resolve else None
        if name in LOOPBACK_NAMES or name.endswith(".localhost"):
            addresses: list[IPAddress] = [
                ipaddress.IPv4Address("127.0.0.1"),
                ipaddress.IPv6Address("::1"),
            ]
            for address in addresses:
                if self._allowed(address):
                    return Destination(name, address)
            raise NotAllowed(f"{host} is a loopback name; {HINT}")
        if name in METADATA_NAMES:
            raise NotAllowed(f"{host} is a cloud metadata service name; {HINT}")
        for address in _resolve(name, port):
            if self._allowed(address):
                return Destination(name, address)
        raise NotAllowed(f"{host} does not resolve to a public address; {HINT}")

    def check_url(self, url: str, *, resolve: bool = True) -> Destination | None:
        """`check` for the host and port of an http(s) URL."""
        try:
            parts = urlsplit(url)
            host = parts.hostname
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise NotAllowed(f"{url} cannot be parsed") from None
        if not host:
            raise NotAllowed(f"{url} has no host")
        return self.check(host, port, resolve=resolve)


def _resolve(name: str, port: int) -> list[IPAddress]:
    """The addresses `name` resolves to, in the resolver's order; NotAllowed if none."""
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise NotAllowed(f"{name} does not resolve to a public address; {HINT}") from None
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    return addresses
