"""Imported by Python at start-up when this folder is on PYTHONPATH (tests put it there): any
connection to an address other than this machine's loopback fails, in every Python process the
tested command starts, so a passing test shows the command needs no network."""

import ipaddress
import socket

_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def _check(address: object) -> None:
    if isinstance(address, tuple) and address:
        host = str(address[0])
        try:
            local = host == "localhost" or ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            local = False
        if not local:
            raise OSError(f"network refused by the test (offline check): {address}")


def _local_connect(self: socket.socket, address: object) -> None:
    _check(address)
    return _connect(self, address)


def _local_connect_ex(self: socket.socket, address: object) -> int:
    _check(address)
    return _connect_ex(self, address)


socket.socket.connect = _local_connect
socket.socket.connect_ex = _local_connect_ex
