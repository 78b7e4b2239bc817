from __future__ import annotations

import socket

from benchmarks.ports import RAY_WORKER_PORTS_END, candidate_ports, ephemeral_range, free_port, free_ports


def test_ports_are_distinct_free_and_outside_the_kernels_ephemeral_range():
    low, high = ephemeral_range()
    ports = free_ports(200) + [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports) == 250
    assert all(p > RAY_WORKER_PORTS_END and not low <= p <= high for p in ports), (low, high, sorted(ports))
    for port in ports[:20]:
        with socket.socket() as s:
            s.bind(("", port))  # free: binding it succeeds


def test_a_bound_port_is_never_handed_out():
    low = RAY_WORKER_PORTS_END + 1
    held = []
    try:
        for port in range(low, low + 200):
            s = socket.socket()
            try:
                s.bind(("", port))
            except OSError:
                s.close()
                continue
            held.append((s, port))
        taken = {p for _, p in held}
        assert not taken & set(free_ports(500))
    finally:
        for s, _ in held:
            s.close()


def test_ephemeral_range_is_the_kernels_and_candidates_avoid_it():
    # What a bind(0) -- any other process's server or client -- gets lies in the range read,
    # and no candidate does.
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    low, high = ephemeral_range()
    assert low <= port <= high
    assert port not in set(candidate_ports())
