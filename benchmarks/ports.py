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

import random
import socket
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


def free_ports(n: int, host: str = "") -> list[int]:
    """``n`` distinct ports, free now on ``host`` and outside the kernel's ephemeral range.

    Falls back to ``bind(0)`` (all ``n`` sockets held open together, so still distinct)
    when the machine leaves no room between Ray's worker ports and the ephemeral range.
    """
    low = RAY_WORKER_PORTS_END + 1
    high = ephemeral_range()[0] - 1
    candidates = [p for p in range(low, high + 1) if p not in _handed_out]
    random.SystemRandom().shuffle(candidates)  # not the global generator a benchmark may have seeded
    ports: list[int] = []
    for port in candidates:
        if len(ports) == n:
            break
        if _bindable(port, host):
            ports.append(port)
    if len(ports) < n:
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
