"""`serving.workers.listening_sockets`: a socket per worker on one port, and a clear error
when the port is taken, also by another server's SO_REUSEPORT group (which these
sockets could otherwise join)."""

from __future__ import annotations

import socket

import pytest
from uvicorn import Config

from recstream import stack
from serving.workers import listening_sockets


def config(port: int) -> Config:
    return Config("serving.app:app_from_env", host="127.0.0.1", port=port, workers=2)


def test_a_socket_per_worker_on_one_port() -> None:
    port = stack.free_port()
    sockets = listening_sockets(config(port), 2)
    try:
        assert [s.getsockname()[1] for s in sockets] == [port, port]
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in sockets)
    finally:
        for s in sockets:
            s.close()


def test_a_port_another_server_holds_is_refused_with_what_to_do() -> None:
    port = stack.free_port()
    first = listening_sockets(config(port), 2)  # another `recstream serve --workers 2`
    try:
        with pytest.raises(OSError, match=rf"127\.0\.0\.1:{port}.*--port"):
            listening_sockets(config(port), 2)
    finally:
        for s in first:
            s.close()
    plain = socket.socket()
    plain.bind(("127.0.0.1", port))
    plain.listen()
    try:
        with pytest.raises(OSError, match="another server"):
            listening_sockets(config(port), 2)
    finally:
        plain.close()
