"""localstack/docker-compose.yml, checked without Docker (none on the project's machines).

What `docker compose up` would show first: that the hook folder it mounts is ours, that
the names it sets are the ones the hook reads, that the image is the release the second
tier passes against, and that "healthy" means the hook ran and succeeded. Whether the
file follows the compose specification was checked once by hand (docs/local-stack.md).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import yaml

from recstream import stack

COMPOSE = stack.ROOT / "localstack" / "docker-compose.yml"


def localstack_service() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    service: dict[str, Any] = document["services"]["localstack"]
    return service


def hook_defaults() -> dict[str, str]:
    spec = importlib.util.spec_from_file_location("init_script", stack.INIT_SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    defaults: dict[str, str] = module.DEFAULTS
    return defaults


def test_the_mounted_hook_folder_is_the_init_folder() -> None:
    mounts = [volume.split(":") for volume in localstack_service()["volumes"]]
    hooks = [m for m in mounts if m[1] == "/etc/localstack/init/ready.d"]
    assert len(hooks) == 1, mounts
    # compose resolves a relative source against the compose file's folder
    assert (COMPOSE.parent / hooks[0][0]).resolve() == stack.INIT_SCRIPT.parent


def test_the_environment_sets_what_the_hook_reads_with_its_defaults() -> None:
    environment: dict[str, str] = localstack_service()["environment"]
    defaults = hook_defaults()
    ours = {name for name in environment if name.startswith("RECSTREAM_")}
    # Every name is one the hook reads, and it reads none the file leaves to chance.
    assert ours == set(defaults)
    for name, value in environment.items():
        if match := re.fullmatch(r"\$\{(\w+):-(.*)\}", str(value)):
            # ${NAME:-default}: the user's own value, or the same default as the hook's
            assert match[1] == name
            assert match[2] == defaults[name], name
    # Inside the container LocalStack is localhost, and Kinesis is its own.
    assert environment["RECSTREAM_AWS_ENDPOINT_URL"] == "http://localhost:4566"
    assert environment["RECSTREAM_KINESIS_ENDPOINT_URL"] == ""
    services = set(environment["SERVICES"].split(","))
    assert services >= {"kinesis", "dynamodb", "s3", "sqs", "kms"}


def test_the_image_is_the_release_the_second_tier_runs() -> None:
    dev = (stack.ROOT / "dev").read_text()
    pinned = re.search(r"localstack-core\[runtime\]==([\d.]+)", dev)
    assert pinned is not None
    assert localstack_service()["image"] == f"localstack/localstack:{pinned[1]}"


def test_healthy_means_our_hook_ran_and_succeeded() -> None:
    test = localstack_service()["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    command = " ".join(test[1:])
    assert "/_localstack/init/ready" in command
    assert Path(stack.INIT_SCRIPT).name in command
    assert "SUCCESSFUL" in command
