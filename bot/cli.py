"""The `deploybot` command: `serve` runs the bot, `sandbox` walks a local trial end to end.

`repo-id forget` lets the bot take a re-created repository's new id (see policies.repo_identity).
"""

from __future__ import annotations

import argparse
import os
import sys

from bot.config import ConfigError, load_config
from bot.jobs.sandbox import SandboxError, harden_process
from bot.store import SchemaTooNew, StoreInUse
from policies.validation import PolicyError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploybot", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP server and its workers")
    serve.add_argument("--config", help="YAML config file (default: $DEPLOYBOT_CONFIG)")
    serve.add_argument("--log-level", default="info")

    sandbox = commands.add_parser(
        "sandbox", help="a self-contained local trial: plan, approve and apply on a local forge")
    sandbox.add_argument("--dir", help="where to keep the trial's files (default: a temp dir)")
    sandbox.add_argument("--keep", action="store_true", help="keep the files afterwards")
    sandbox.add_argument("--forge", choices=["github", "gitlab"], default="github",
                         help="which local forge to run the trial on")

    # Every argument after `run` goes to bot.ci.cli as is: its usage errors exit 1, never 2
    # (2 means "changes present"), and `deploybot run --help` is its own help.
    run = commands.add_parser("run", add_help=False, prefix_chars="\0",
                              help="plan or apply through a deploybot server, for CI jobs (see `deploybot run --help`)")
    run.add_argument("run_args", nargs=argparse.REMAINDER)

    from bot.forges.github.app_setup import add_create_parser
    from bot.runners.runner import add_runner_parser

    add_create_parser(commands)
    add_runner_parser(commands)

    tokens = commands.add_parser("runner-token", help="the tokens runners of a pool claim jobs with "
                                                      "(admin token in $DEPLOYBOT_ADMIN_TOKEN)")
    token_commands = tokens.add_subparsers(dest="token_command", required=True)
    create = token_commands.add_parser("create", help="make a token for a pool; it is printed once, stored hashed")
    create.add_argument("--pool", required=True)
    revoke = token_commands.add_parser("revoke", help="revoke a token: its runner gets 401 from then on")
    revoke.add_argument("id", type=int)
    token_commands.add_parser("list", help="the tokens (ids, pools, when made and revoked; never the tokens)")
    for sub in (create, revoke, token_commands.choices["list"]):
        sub.add_argument("--server", default=os.environ.get("DEPLOYBOT_SERVER"),
                         help="the deploybot URL (default: $DEPLOYBOT_SERVER)")

    audit = commands.add_parser("audit", help="print the server's audit log (admin token in $DEPLOYBOT_ADMIN_TOKEN)")
    audit.add_argument("--server", default=os.environ.get("DEPLOYBOT_SERVER"),
                       help="the deploybot URL (default: $DEPLOYBOT_SERVER)")
    audit.add_argument("--limit", type=int, default=100, help="how many of the newest entries")

    repo_id = commands.add_parser("repo-id", help="the forge ids the bot holds repository names to")
    repo_id_commands = repo_id.add_subparsers(dest="repo_id_command", required=True)
    forget = repo_id_commands.add_parser(
        "forget", help="forget the id recorded for a repository that was re-created on purpose:"
                       " the next event's id is recorded instead")
    forget.add_argument("--config", help="YAML config file of the server (default: $DEPLOYBOT_CONFIG)")
    forget.add_argument("forge", choices=["github", "gitlab"])
    forget.add_argument("name", help="the repository's full name, e.g. acme/infrastructure-live")

    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args.config, args.log_level)
        if args.command == "audit":
            return _audit(args.server, args.limit)
        if args.command == "repo-id":
            return _forget_repo_id(args.config, args.forge, args.name)
        if args.command == "run":
            from bot.ci.cli import main as run_main

            return run_main(args.run_args)
        if args.command == "runner":
            from bot.runners.runner import run_runner

            return run_runner(args)
        if args.command == "runner-token":
            return _runner_token(args)
        if args.command == "github-app":
            from bot.forges.github.app_setup import run_create

            return run_create(args)
        from bot.sandbox.trial import run_sandbox

        return run_sandbox(args.dir, keep=args.keep, forge_name=args.forge)
    except (ConfigError, PolicyError, SandboxError, StoreInUse, SchemaTooNew) as exc:
        print(f"deploybot: {exc}", file=sys.stderr)
        return 2


def _audit(server: str | None, limit: int) -> int:
    import datetime

    import httpx

    token = os.environ.get("DEPLOYBOT_ADMIN_TOKEN", "")
    if not server or not token:
        print("deploybot audit: give --server (or $DEPLOYBOT_SERVER) and $DEPLOYBOT_ADMIN_TOKEN", file=sys.stderr)
        return 1
    try:
        response = httpx.get(f"{server.rstrip('/')}/api/v1/audit", params={"limit": limit},
                             headers={"Authorization": f"Bearer {token}"}, timeout=30)
    except httpx.HTTPError as exc:
        print(f"deploybot audit: cannot reach {server}: {type(exc).__name__}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        print(f"deploybot audit: {response.status_code} {response.text[:200]}", file=sys.stderr)
        return 1
    for entry in reversed(response.json()["entries"]):
        when = datetime.datetime.fromtimestamp(entry["at"], datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        where = " ".join(x for x in (entry["repo"], entry["project"], entry["sha"][:8]) if x)
        print(f"{when}  {entry['actor']:<24} {entry['action']:<10} {entry['outcome']:<12} {where}  {entry['detail']}")
    return 0


def _forget_repo_id(config_path: str | None, forge: str, name: str) -> int:
    """Delete the id recorded for a repository in the server's store, and audit it."""
    import getpass

    from bot.models import Repo
    from bot.store import Store, repo_key

    config = load_config(config_path)
    store = Store(config.server.database)
    try:
        forgotten = store.forget_repo_id(repo_key(Repo(forge, name, clone_url="", default_branch="")))
        if forgotten is None:
            # Exit 1: a misspelt name must not look like a reset.
            print(f"deploybot: no id is recorded for {forge} repository {name}", file=sys.stderr)
            return 1
        store.audit(f"cli:{getpass.getuser()}", "repo-id forget", "forgotten", name, detail=f"{forge} id {forgotten}")
    finally:
        store.close()
    print(f"forgot id {forgotten} of {forge} repository {name}: the id of its next event is recorded instead")
    return 0


def _runner_token(args: argparse.Namespace) -> int:
    """Make, revoke or list runner tokens through the server's admin API (admin token in the environment)."""
    import httpx

    token = os.environ.get("DEPLOYBOT_ADMIN_TOKEN", "")
    if not args.server or not token:
        print("deploybot runner-token: give --server (or $DEPLOYBOT_SERVER) and $DEPLOYBOT_ADMIN_TOKEN", file=sys.stderr)
        return 1
    url = f"{args.server.rstrip('/')}/api/v1/runner-tokens"
    headers = {"Authorization": f"Bearer {token}"}
    try:
        if args.token_command == "create":
            response = httpx.post(url, json={"pool": args.pool}, headers=headers, timeout=30)
        elif args.token_command == "revoke":
            response = httpx.delete(f"{url}/{args.id}", headers=headers, timeout=30)
        else:
            response = httpx.get(url, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        print(f"deploybot runner-token: cannot reach {args.server}: {type(exc).__name__}", file=sys.stderr)
        return 1
    if response.status_code >= 300:
        print(f"deploybot runner-token: {response.status_code} {response.text[:200]}", file=sys.stderr)
        return 1
    if args.token_command == "create":
        made = response.json()
        print(f"# token {made['id']} of pool {made['pool']}: shown this once, keep it in the runner's secret store",
              file=sys.stderr)
        print(made["token"])
    elif args.token_command == "revoke":
        print(f"revoked token {args.id}")
    else:
        import datetime

        for entry in response.json()["tokens"]:
            made = datetime.datetime.fromtimestamp(entry["created_at"], datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            print(f"{entry['id']:>5}  {entry['pool']:<20} {made}  {'revoked' if entry['revoked_at'] else 'active'}")
    return 0


def _serve(config_path: str | None, log_level: str) -> int:
    import uvicorn

    from bot.app import create_app
    from bot.logs import configure_logging

    config = load_config(config_path)
    harden_process()
    configure_logging(log_level, config.secrets())
    app = create_app(config)
    # log_config=None: uvicorn's records go through the same JSON lines as ours.
    uvicorn.run(app, host=config.server.host, port=config.server.port, log_level=log_level,
                lifespan="on", log_config=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
