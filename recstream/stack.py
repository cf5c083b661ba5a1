"""The embedded local stack: redis-server, moto server and kinesis-mock on loopback.

`recstream up` starts them as daemons (pid files and logs under ``Settings.state_dir``)
and the test suite starts private copies on free ports with the same functions, so the
code that the tests exercise is the code users run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recstream.errors import StackError
from recstream.settings import Settings

__all__ = [
    "INIT_SCRIPT",
    "Server",
    "create_resources",
    "disk_usage",
    "free_port",
    "read_pidfile",
    "start_kinesis_mock",
    "start_localstack",
    "start_moto",
    "start_redis",
    "stop_pidfile",
    "wait_for_init",
    "wait_for_port",
]

ROOT = Path(__file__).resolve().parent.parent
INIT_SCRIPT = ROOT / "localstack" / "init" / "ready.d" / "10_recstream_resources.py"


@dataclass
class Server:
    """A local server process we started, and how to reach it."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            # Servers run in their own process group so that node's or moto's children go too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def wait_for_port(server: Server, timeout: float = 30.0) -> Server:
    """Block until the server accepts connections; fail loudly with its log if it dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise StackError(
                f"{server.name} exited with code {server.process.returncode} before listening "
                f"on port {server.port}; its log ({server.log}) ends with:\n{_tail(server.log)}"
            )
        if port_open(server.port):
            return server
        time.sleep(0.05)
    server.stop()
    raise StackError(
        f"{server.name} did not listen on port {server.port} within {timeout:.0f}s; "
        f"see {server.log}:\n{_tail(server.log)}"
    )


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _spawn(
    name: str,
    argv: list[str],
    port: int,
    log: Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Server:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    return Server(name=name, process=process, port=port, log=log)


def start_redis(port: int, workdir: Path, *, durable: bool = False) -> Server:
    """redis-server on loopback; ``durable`` keeps its data in ``workdir`` across restarts
    (an append-only file fsynced every second, plus RDB snapshots for fast loading)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise StackError(
            "redis-server is not installed; run `./dev setup` (apt-get install redis-server)"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(workdir),
        *(
            # `recstream up`: windows, features, counters and published models survive
            # `down`/`up` and a reboot; at most the last second is lost in a crash.
            ["--appendonly", "yes", "--appendfsync", "everysec", "--save", "300 1"]
            if durable
            # the suite's private servers: nothing to keep
            else ["--save", "", "--appendonly", "no"]
        ),
        "--protected-mode", "yes",
        # Every key recstream writes has a cap or a TTL; this is the last line of defence.
        "--maxmemory", "1gb",
        # Fail loudly rather than evict: evicting idempotence memory or windows would
        # silently double-count or forget; every key is already capped or expiring.
        "--maxmemory-policy", "noeviction",
    ]  # fmt: skip
    return wait_for_port(_spawn("redis-server", argv, port, workdir / "redis.log"))


def start_moto(
    port: int,
    workdir: Path,
    *,
    state_dir: Path | None = None,
    snapshot_every_s: float = 10.0,
    max_records_per_shard: int = 500_000,
    log_slack: int = 100_000,
    metrics_period_s: float = 60.0,
) -> Server:
    """moto's server through `recstream.emulator` (O(1) Kinesis, retention trim); with a
    ``state_dir`` its state is saved there and loaded back at the next start
    (``log_slack``: see `recstream.emulator.Snapshots`; ``metrics_period_s``: see
    `recstream.emulator.patch_kinesis_metrics`)."""
    argv = [
        sys.executable, "-m", "recstream.emulator", "-H", "127.0.0.1", "-p", str(port),
        "--snapshot-every", str(snapshot_every_s), "--max-records", str(max_records_per_shard),
        "--log-slack", str(log_slack), "--metrics-period", str(metrics_period_s),
    ]  # fmt: skip
    if state_dir is not None:
        argv += ["--state-dir", str(state_dir)]
    return wait_for_port(_spawn("moto server", argv, port, workdir / "moto.log"), timeout=60)


def start_kinesis_mock(
    port: int, workdir: Path, package_dir: Path, *, persist_dir: Path | None = None
) -> Server:
    """kinesis-mock under node; with ``persist_dir`` its streams are saved there every
    second and loaded back at the next start."""
    main_js = package_dir / "main.js"
    if not main_js.is_file():
        raise StackError(
            f"kinesis-mock is not installed at {package_dir}; run `./dev setup` "
            "(npm install kinesis-local)"
        )
    node = shutil.which("node")
    if node is None:
        raise StackError("node is not installed; run `./dev setup` (apt-get install nodejs)")
    env = {
        "KINESIS_MOCK_PLAIN_PORT": str(port),
        "KINESIS_MOCK_TLS_PORT": str(free_port()),
        "LOG_LEVEL": "WARN",
        # Resharding in the emulator takes as long as a real one would take a short while.
        "SPLIT_SHARD_DURATION": "200ms",
        "MERGE_SHARDS_DURATION": "200ms",
        "UPDATE_SHARD_COUNT_DURATION": "200ms",
        # Real accounts start at 500 (200 in some regions); kinesis-mock's default of 50 is
        # reached by one test session's streams, each test having its own.
        "SHARD_LIMIT": "2000",
    }
    if persist_dir is not None:
        persist_dir.mkdir(parents=True, exist_ok=True)
        env.update(
            SHOULD_PERSIST_DATA="true",
            LOAD_DATA_IF_EXISTS="true",
            PERSIST_PATH=str(persist_dir.resolve()),
            PERSIST_INTERVAL="1s",
        )
    # kinesis-mock reads its TLS certificate (server.json) from the working directory.
    server = _spawn(
        "kinesis-mock", [node, str(main_js)], port, workdir / "kinesis-mock.log",
        cwd=package_dir, env=env,
    )  # fmt: skip
    return wait_for_port(server, timeout=60)


def start_localstack(port: int, workdir: Path, settings: Settings) -> Server:
    """LocalStack in host mode, from its own virtualenv (`./dev localstack-setup`).

    Its ready hooks are our init folder, as in localstack/docker-compose.yml, so the
    start also proves the init script works as a LocalStack ready hook."""
    python = settings.localstack_venv.resolve() / "bin" / "python"
    if not python.is_file():
        raise StackError(
            f"LocalStack is not installed at {settings.localstack_venv}; "
            "run `./dev localstack-setup`"
        )
    root = workdir / "localstack"
    init = root / "etc" / "localstack" / "init"
    init.mkdir(parents=True, exist_ok=True)
    if not (init / "ready.d").exists():
        (init / "ready.d").symlink_to(INIT_SCRIPT.parent)
    env = {
        "OVERRIDE_IN_DOCKER": "0",
        "FILESYSTEM_ROOT": str(root),
        "GATEWAY_LISTEN": f"127.0.0.1:{port}",
        # kms: LocalStack's DynamoDB creates a KMS key for a table with SSESpecification
        # KMS; without the service CreateTable answers 500 after creating the table.
        "SERVICES": "kinesis,dynamodb,s3,sqs,kms",
        # As for our own kinesis-mock: LocalStack's default of 100 shards is reached by
        # one test session's streams (each test has its own, of 2 to 4 shards). Creating
        # a stream or a reshard still takes KINESIS_LATENCY (500 ms), as on AWS.
        "KINESIS_SHARD_LIMIT": "5000",
        # Nothing to keep between runs: the suite's data lives as long as the session.
        "KINESIS_PERSISTENCE": "0",
        # what the ready hook reads (LocalStack passes its environment to hooks)
        **resource_env(settings),
        "RECSTREAM_AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "RECSTREAM_KINESIS_ENDPOINT_URL": "",
    }
    argv = [str(python), str(ROOT / "localstack" / "host.py"), str(settings.dynamodb_local_dir)]
    server = _spawn("localstack", argv, port, workdir / "localstack.log", env=env)
    wait_for_port(server, timeout=180)
    # The port opens before LocalStack is ready and before its ready hooks ran: a client
    # that starts now does not find the hook's stream yet.
    wait_for_init(server, INIT_SCRIPT.name, timeout=180)
    return server


def wait_for_init(server: Server, script: str, timeout: float = 180.0) -> None:
    """Block until LocalStack ran its ready hooks; fail with its log unless ``script``
    was among them and succeeded."""
    url = f"{server.url}/_localstack/init/ready"
    deadline = time.monotonic() + timeout
    report: dict[str, Any] = {}
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise StackError(
                f"{server.name} exited with code {server.process.returncode} while starting; "
                f"its log ({server.log}) ends with:\n{_tail(server.log)}"
            )
        with (
            contextlib.suppress(OSError, ValueError),
            urllib.request.urlopen(url, timeout=5) as response,
        ):
            report = json.loads(response.read())
        if report.get("completed"):
            break
        time.sleep(0.2)
    else:
        server.stop()
        raise StackError(
            f"{server.name}'s ready hooks did not complete within {timeout:.0f}s; "
            f"see {server.log}:\n{_tail(server.log)}"
        )
    states = {entry.get("name"): entry.get("state") for entry in report.get("scripts", [])}
    if states.get(script) != "SUCCESSFUL":
        server.stop()
        raise StackError(
            f"{server.name}'s ready hook {script} did not succeed ({states or 'no hooks ran'}); "
            f"see {server.log}:\n{_tail(server.log)}"
        )


def resource_env(settings: Settings) -> dict[str, str]:
    """The settings the init script reads, as environment variables."""
    return {
        "RECSTREAM_AWS_ENDPOINT_URL": settings.aws_endpoint_url or "",
        "RECSTREAM_KINESIS_ENDPOINT_URL": settings.kinesis_endpoint_url or "",
        "RECSTREAM_AWS_REGION": settings.aws_region,
        "RECSTREAM_STREAM_NAME": settings.stream_name,
        "RECSTREAM_STREAM_SHARDS": str(settings.stream_shards),
        "RECSTREAM_TABLE_PREFIX": settings.table_prefix,
        "RECSTREAM_BUCKET": settings.bucket,
        "RECSTREAM_DLQ_NAME": settings.dlq_name,
    }


def create_resources(settings: Settings) -> None:
    """Run the idempotent init script in this process, with these settings."""
    # The script lives outside any package (it is also a LocalStack ready hook), so it is
    # loaded by path rather than imported.
    spec = importlib.util.spec_from_file_location("recstream_init_resources", INIT_SCRIPT)
    if spec is None or spec.loader is None:
        raise StackError(f"cannot load the init script {INIT_SCRIPT}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.main(resource_env(settings))
    except (SystemExit, Exception) as exc:
        raise StackError(
            f"creating resources at {settings.aws_endpoint_url or 'AWS'} failed: {exc}"
        ) from exc


# --- daemons for `recstream up` / `recstream down` -------------------------------------


def write_pidfile(state_dir: Path, server: Server) -> None:
    safe = server.name.replace(" ", "-")
    (state_dir / f"{safe}.pid").write_text(f"{server.process.pid} {server.port}\n")


def _is_ours(pid: int, port: int) -> bool:
    """Whether ``pid`` still is the server we started (its command line names its port),
    so a stale pid file after a reboot never kills an unrelated process."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return str(port).encode() in cmdline or b"kinesis" in cmdline


def read_pidfile(pidfile: Path) -> tuple[int, int] | None:
    """(pid, port) of a server a pid file names, if it is still running and ours."""
    try:
        pid_text, port_text = pidfile.read_text().split()[:2]
        pid, port = int(pid_text), int(port_text)
    except (OSError, ValueError):
        return None
    return (pid, port) if _is_ours(pid, port) else None


def disk_usage(path: Path) -> int:
    """Bytes of the files under ``path`` (0 if it does not exist)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def stop_pidfile(pidfile: Path, timeout: float = 60.0) -> bool:
    """Stop the process group a pid file names; True if something was running.

    The timeout is generous because the emulator saves its state when it stops."""
    try:
        pid_text, port_text = pidfile.read_text().split()[:2]
        pid, port = int(pid_text), int(port_text)
    except (OSError, ValueError):
        pidfile.unlink(missing_ok=True)
        return False
    if not _is_ours(pid, port):
        pidfile.unlink(missing_ok=True)
        return False
    running = True
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        running = False
    deadline = time.monotonic() + timeout
    while running and time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        if running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)
    return running
