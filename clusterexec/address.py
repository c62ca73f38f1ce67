"""Where the master is: "host", "host:port", "[v6]:port" or ":port", with a default port."""

from __future__ import annotations

DEFAULT_PORT = 7070


def parse_address(address: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """"host" → (host, 7070); "host:port" → (host, port); "" or ":port" → 127.0.0.1."""
    address = address.strip()
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest.lstrip(":")
    elif address.count(":") == 1:
        host, port = address.split(":")
    else:
        host, port = address, ""
    if not port:
        return host or "127.0.0.1", default_port
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise ValueError(f"invalid address {address!r}: the port must be a number, as in HOST:{default_port}") from None
