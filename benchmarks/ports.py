"""Free TCP ports for the servers the benchmarks and tests start (Ray nodes, the service, gloo).

Binding port 0, closing the socket and handing the number on is racy twice over: the
kernel may hand the same number to the next ``bind(0)`` (two components of one
``ray start`` then collide, and Ray refuses to start), and any process on the machine
may take it through its own ``bind(0)`` or outgoing connection before our server binds
it. Ports are therefore drawn from outside the kernel's ephemeral range (which
``bind(0)`` and ``connect`` draw from) and above Ray's worker ports, checked free by
binding, and never handed out twice by one process.
"""
from __future__ import annotations

import os
import random
import socket
import warnings
from pathlib import Path

RAY_WORKER_PORTS_END = 19999  # ray start's default --max-worker-port
_handed_out: set[int] = set()


def ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _bindable(port: int, host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def candidate_ports() -> list[int]:
    """Ports above Ray's worker ports and outside the kernel's ephemeral range (below or above it)."""
    low, high = ephemeral_range()
    return [p for p in range(RAY_WORKER_PORTS_END + 1, 65536) if not low <= p <= high]


def free_ports(n: int, host: str = "") -> list[int]:
    """``n`` distinct IPv4 ports, free now on ``host`` and outside the kernel's ephemeral range.

    Distinct within this process; another process drawing at the same moment could draw
    the same port (one chance in thousands). Falls back, with a warning, to ``bind(0)``
    (all ``n`` sockets held open together, so still distinct) when the machine's
    ephemeral range leaves too few ports outside it.
    """
    candidates = [p for p in candidate_ports() if p not in _handed_out]
    random.Random(os.urandom(16)).shuffle(candidates)  # not the global generator a benchmark may have seeded
    ports: list[int] = []
    for port in candidates:
        if len(ports) == n:
            break
        if _bindable(port, host):
            ports.append(port)
    if len(ports) < n:
        warnings.warn(f"only {len(ports)} free ports outside the ephemeral range {ephemeral_range()}; "
                      "the rest come from bind(0), which other processes may race for", stacklevel=2)
        socks = []
        try:
            while len(ports) < n:
                s = socket.socket()
                socks.append(s)
                s.bind((host, 0))
                port = s.getsockname()[1]
                if port not in _handed_out and port not in ports:
                    ports.append(port)
        finally:
            for s in socks:
                s.close()
    _handed_out.update(ports)
    return ports


def free_port(host: str = "") -> int:
    return free_ports(1, host)[0]
