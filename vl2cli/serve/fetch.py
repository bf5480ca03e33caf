"""Remote images (`vl2 serve --allow-remote-images`), fetched only from public addresses.

A client's URL must not turn the server into its proxy to the machine's own services or its network (the cloud
metadata service at 169.254.169.254, a database on 10.0.0.5, the server itself). So the host name is resolved once,
every address it resolves to is checked (loopback, private, link-local, multicast, reserved: refused), and the
connection goes to the checked address, so a DNS answer that changes between the check and the connect (a rebind)
cannot redirect it. Redirects are followed, each checked the same way. Errors say what went wrong in words, never the
socket's own message (which can describe the server's network).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from urllib.parse import urljoin, urlsplit

MAX_REDIRECTS = 3
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class FetchError(Exception):
    """Why an image could not be fetched, in words a client may read."""


def address_refusal(ip: IPAddress) -> str | None:
    """Why the server will not connect to `ip`, or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind, bad in (("a loopback", ip.is_loopback), ("a link-local", ip.is_link_local),
                      ("a private", ip.is_private), ("a multicast", ip.is_multicast),
                      ("an unspecified", ip.is_unspecified), ("a reserved", ip.is_reserved)):
        if bad:
            return f"{kind} address"
    return None if ip.is_global else "not a public address"


def fetch(url: str, timeout: float, max_bytes: int) -> bytes:
    """The body of an http(s) URL (at most max_bytes + 1 bytes, so the caller can tell it was too large)."""
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise FetchError("the URL's port is not a number") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchError("not an http(s) URL")
        address = _checked_address(parts.hostname, port)
        connection = _Pinned(parts.hostname, address, port, timeout, parts.scheme == "https")
        try:
            connection.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                               headers={"User-Agent": "vl2", "Accept": "image/*"})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("location"):
                url = urljoin(url, response.getheader("location", ""))
                continue
            if response.status != 200:
                raise FetchError(f"the image server answered HTTP {response.status}")
            return response.read(max_bytes + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise FetchError(_in_words(exc)) from None
        finally:
            connection.close()
    raise FetchError(f"more than {MAX_REDIRECTS} redirects")


def _checked_address(host: str, port: int) -> str:
    """The address to connect to, once every address the name resolves to has been checked."""
    try:
        found = {str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except (OSError, UnicodeError):
        raise FetchError(f"the host name {host[:100]!r} does not resolve") from None
    for address in sorted(found):
        refusal = address_refusal(ipaddress.ip_address(address.split("%")[0]))
        if refusal is not None:
            raise FetchError(f"{host[:100]} is {refusal}: remote images come only from public addresses")
    return sorted(found)[0]


class _Pinned(http.client.HTTPConnection):
    """A connection to an address already checked, speaking to `host` (its Host header; for https its name for SNI
    and the certificate check)."""

    def __init__(self, host: str, address: str, port: int, timeout: float, tls: bool):
        super().__init__(host, port, timeout=timeout)
        self.address, self.tls = address, tls
        self.default_port = 443 if tls else 80  # the Host header names a port only when it is not the scheme's

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host) if self.tls else sock


def _in_words(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "the connection timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "the connection was refused"
    if isinstance(exc, ssl.SSLError):
        return "the TLS handshake failed (the certificate does not check out?)"
    if isinstance(exc, http.client.HTTPException):
        return "the image server's answer is not valid HTTP"
    return "the connection failed"
