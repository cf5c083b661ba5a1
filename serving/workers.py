"""Several API processes on one port, each accepting on a listening socket of its own.

uvicorn's ``--workers N`` binds one socket in the parent and every worker accepts from
it. Which waiting worker the kernel wakes for a new connection is not balanced (it tends
to be the same one), and an HTTP/1.1 keep-alive connection stays with the process that
accepted it for its whole life. Measured under
`bench.serving --workers 2` at 1,000 req/s: one worker used 24.9 s of CPU and the other
9.5 s over the same run (a 72/28 split), the busy one queued requests while the other
idled, and its bursts were most of the p99 (docs/serving-speed.md, session 15).

Here each worker gets its own socket on the same address, bound with ``SO_REUSEPORT``:
the kernel spreads new connections over the sockets by a hash of the address pair,
whichever worker is waiting. The supervision is uvicorn's (`Multiprocess`: worker
health checks, restarts, signals); only which socket a worker is given changes, and a
worker restarted in its slot takes over its predecessor's socket and the connections
queued on it.
"""

from __future__ import annotations

import logging
import socket
import sys

from uvicorn import Config
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

__all__ = ["ReusePortMultiprocess", "listening_sockets", "serve"]

logger = logging.getLogger("uvicorn.error")


def listening_sockets(config: Config, count: int) -> list[socket.socket]:
    """``count`` sockets listening on ``config``'s host and port, in one ``SO_REUSEPORT``
    group (the kernel balances new connections over them)."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    # SO_REUSEPORT would also let these join another server's group on the port (a
    # second `recstream serve` on it would take a share of its connections): the port
    # must be free first, as for a plain bind.
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((config.host, config.port))
        except OSError as exc:
            raise OSError(
                f"cannot listen on {config.host}:{config.port}: {exc}; is another server "
                "using the port? (`--port` picks another)"
            ) from exc
    sockets: list[socket.socket] = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((config.host, config.port))
        except OSError as exc:
            for opened in [*sockets, sock]:
                opened.close()
            raise OSError(
                f"cannot listen on {config.host}:{config.port}: {exc}; is another server "
                "using the port? (`--port` picks another)"
            ) from exc
        sock.listen(config.backlog)
        sock.set_inheritable(True)
        sockets.append(sock)
    return sockets


class ReusePortMultiprocess(Multiprocess):
    """uvicorn's supervisor, the worker in slot ``i`` always on socket ``i``.

    uvicorn makes every process (the first start, a restart after a death, the rolling
    restart on SIGHUP) with ``Process(self.config, self.sockets)``; the three methods
    that do are uvicorn 0.54's, with the slot's socket instead of the list."""

    def __init__(self, config: Config, sockets: list[socket.socket]) -> None:
        if len(sockets) != config.workers:
            raise ValueError(f"{config.workers} workers need as many sockets, not {len(sockets)}")
        super().__init__(config, sockets)

    def _start(self, slot: int) -> Process:
        process = Process(self.config, [self.sockets[slot]])
        process.start()
        return process

    def init_processes(self) -> None:
        self.processes = [self._start(slot) for slot in range(self.processes_num)]

    def keep_subprocess_alive(self) -> None:
        if self.should_exit.is_set():
            return
        for slot, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()  # hung: killed
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                # a worker that failed before serving would fail the same way again
                logger.error(f"Child process [{process.pid}] failed to start, stopping.")
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            logger.info(f"Child process [{process.pid}] died")
            self.processes[slot] = self._start(slot)

    def restart_all(self) -> None:
        """Each worker replaced by a new one on its socket, the new one serving before
        the old one stops (SIGHUP)."""
        for slot, old in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new = self._start(slot)
            if not new.wait_until_ready(self.config.timeout_worker_healthcheck, self.should_exit):
                new.kill()
                new.join()
                if not self.should_exit.is_set():
                    logger.error(
                        f"New child process [{new.pid}] was not ready in time; keeping "
                        f"worker [{old.pid}] and aborting the restart."
                    )
                return
            old.terminate()
            old.join()
            self.processes[slot] = new


def serve(config: Config) -> None:
    """Run ``config.workers`` processes (each loading ``config.app``) until a signal."""
    if not sys.platform.startswith("linux"):
        # Only Linux balances a SO_REUSEPORT group (macOS and the BSDs hand every
        # connection to one socket): elsewhere, uvicorn's one shared socket.
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return
    ReusePortMultiprocess(config, listening_sockets(config, config.workers)).run()
