"""``recstream keys create | list | revoke``: API keys from the command line.

Kept apart from `recstream.apikeys` so that building the CLI's parser (every `recstream`
command does) does not import aiobotocore; the handlers import it when they run.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING, Any

from recstream.settings import Settings

if TYPE_CHECKING:
    from recstream.apikeys import ApiKey, ApiKeyStore

__all__ = ["SCOPE_CHOICES", "register"]

# The same as recstream.apikeys.SCOPES (tests/reliability/test_auth.py checks it).
SCOPE_CHOICES = ("events:write", "recommendations:read", "admin")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = subparsers.add_parser("keys", help="create, list and revoke API keys")
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create a key and print it (once)")
    create.add_argument(
        "--scope",
        action="append",
        required=True,
        choices=SCOPE_CHOICES,
        help="repeatable; admin implies the others",
    )
    create.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="repeatable; '*' (the default) for every namespace",
    )
    create.add_argument("--name", default="", help="a label, e.g. who holds the key")
    create.set_defaults(handler=_cmd_create)
    listing = actions.add_parser("list", help="list keys (ids, scopes; never secrets)")
    listing.set_defaults(handler=_cmd_list)
    revoke = actions.add_parser("revoke", help="revoke a key by id (rs_<id>_… or <id>)")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=_cmd_revoke)


async def _with_store(settings: Settings, action: Any) -> Any:
    from recstream.apikeys import ApiKeyStore
    from recstream.aws import async_client

    async with async_client(settings, "dynamodb") as client:
        store: ApiKeyStore = ApiKeyStore(client, settings)
        return await action(store)


def _cmd_create(args: argparse.Namespace, settings: Settings) -> int:
    from recstream.apikeys import access_key_id, sigv4_secret

    key, plaintext = asyncio.run(
        _with_store(settings, lambda s: s.create(args.scope, args.namespace, args.name))
    )
    print(
        f"created API key {key.key_id} ({', '.join(sorted(key.scopes))}; "
        f"namespaces {', '.join(sorted(key.namespaces))})"
    )
    print("store it now; it is not shown again:")
    print(f"  {plaintext}")
    secret = sigv4_secret(settings, key.key_id)
    if secret is not None:
        print("for SigV4 clients (boto3 on the Personalize-compatible routes):")
        print(f"  aws_access_key_id={access_key_id(key.key_id)}")
        print(f"  aws_secret_access_key={secret}")
    return 0


def _cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    keys: list[ApiKey] = asyncio.run(_with_store(settings, lambda s: s.list()))
    if not keys:
        print("no API keys; create one with `recstream keys create --scope ...`")
    for key in keys:
        state = "revoked" if key.revoked else "active"
        print(
            f"{key.key_id}  {state:7}  {','.join(sorted(key.scopes)):40}  "
            f"{','.join(sorted(key.namespaces)):20}  {key.name}"
        )
    return 0


def _cmd_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from recstream.apikeys import parse_key

    key_id = args.key_id
    parsed = parse_key(key_id)
    if parsed is not None:
        key_id = parsed[0]
    elif key_id.startswith("rs_"):
        key_id = key_id[3:15]
    if not asyncio.run(_with_store(settings, lambda s: s.revoke(key_id))):
        print(f"recstream: no API key {key_id!r}; see `recstream keys list`")
        return 1
    print(
        f"revoked {key_id}; API processes stop accepting it within "
        f"{settings.apikey_cache_ttl_s:g} s (their cache)"
    )
    return 0
