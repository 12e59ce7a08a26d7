"""Addresses on this node, for the servers a process binds (the weight group's TCPStore, the
replay socket): loopback in local runs, the node IP Ray sees on a cluster."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def node_ip() -> str:
    """This process's node IP as Ray sees it (the address other nodes reach it at)."""
    import ray

    return ray.util.get_node_ip_address()


def endpoint(loopback: bool) -> tuple[str, int]:
    """(host, free port) on the calling process's node, for a server it will bind."""
    host = "127.0.0.1" if loopback else node_ip()
    return host, free_port(host)
