"""Sockets in tests: a free loopback port, and which addresses a process tree listens on (the
loopback-only checks)."""

from __future__ import annotations

import ipaddress
import socket

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def listening(processes: list[psutil.Process]) -> list[tuple[str, str]]:
    """(process name, address) of every listening inet socket. A process that exits while it is
    inspected (a short-lived Ray worker) is skipped: psutil then raises NoSuchProcess or, from
    /proc, FileNotFoundError."""
    out = []
    for proc in processes:
        try:
            name, conns = proc.name(), proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            continue
        out += [(name, c.laddr.ip) for c in conns if c.status == psutil.CONN_LISTEN]
    return out
