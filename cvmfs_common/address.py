"""``HOST:PORT`` listen addresses (metrics, the push listener), one parser for both programs."""

from __future__ import annotations


def parse_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` -> (host, port); ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not a HOST:PORT address: {text!r}")
    host = host.strip("[]") or default_host
    return host, int(port)
