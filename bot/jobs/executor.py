"""Running one terraform phase of one job: the one step that differs between the bot and a runner.

The worker hands an `Executor` a `JobSpec` and the job's checked checkout; the executor
runs terraform in a sandbox and gives back an `Execution`: the output, and for a plan
the plan file's bytes. `LocalExecutor` does it in the bot's own process;
`bot.runners.lease.RunnerExecutor` hands the job to a `deploybot runner` elsewhere,
which calls the same `run_phase`. The worker never looks behind this interface.
"""

from __future__ import annotations

import base64
import os
from dataclasses import asdict, dataclass
from typing import BinaryIO, Protocol

from bot.jobs.repo_guard import installed_module_problems, read_job_file
from bot.jobs.sandbox import JobFiles
from bot.jobs.terraform import PhaseResult, Terraform

PLAN_FILE = "plan.tfplan"  # in the job's scratch dir, on the way out (plan) or in (apply)
MAX_PLAN_BYTES = 512 << 20  # a bigger "plan file" is a job filling the bot's memory
LOCK_FILE = ".terraform.lock.hcl"


@dataclass(frozen=True)
class JobSpec:
    """What an executor needs to run one phase: all of it fits in one JSON message to a runner."""

    job_id: int
    phase: str  # plan | apply
    project_dir: str  # relative to the checkout's root
    workspace: str
    env: dict[str, str]  # the phase's environment (with credentials, when the bot assumed the role)
    plan: bytes = b""  # apply: the approved plan's exact bytes
    reuse_init: bool = False  # plan: the working dir kept this pull request's `.terraform`
    lock_file_tracked: bool = False  # the repository commits the project's lock file

    def to_json(self) -> dict:
        """The spec as a runner receives it."""
        return asdict(self) | {"plan": base64.b64encode(self.plan).decode()}

    @classmethod
    def from_json(cls, data: dict) -> "JobSpec":
        """The spec a runner received (raises KeyError, TypeError or ValueError on a bad one)."""
        fields = dict(data)
        fields["plan"] = base64.b64decode(fields.get("plan", ""), validate=True)
        spec = cls(**fields)
        if spec.phase not in ("plan", "apply") or not isinstance(spec.env, dict):
            raise ValueError("bad job spec")
        return spec


@dataclass
class Execution:
    """What running a phase gave: `failure` is empty when terraform did what was asked."""

    output: str
    terraform_seconds: float = 0.0
    failure: str = ""
    has_changes: bool = False  # plan: terraform's detailed exit code said so
    plan: bytes | None = None  # plan: the plan file terraform wrote

    @property
    def ok(self) -> bool:
        return not self.failure

    def to_json(self) -> dict:
        """The result as a runner sends it."""
        return {"output": self.output, "terraform_seconds": self.terraform_seconds, "failure": self.failure,
                "has_changes": self.has_changes,
                "plan": base64.b64encode(self.plan).decode() if self.plan is not None else None}

    @classmethod
    def from_json(cls, data: dict) -> "Execution":
        """A runner's result (raises ValueError, TypeError or AttributeError on a bad one)."""
        plan = data.get("plan")
        return cls(output=str(data.get("output", "")), terraform_seconds=float(data.get("terraform_seconds", 0.0)),
                   failure=str(data.get("failure", "")), has_changes=bool(data.get("has_changes", False)),
                   plan=base64.b64decode(plan, validate=True) if isinstance(plan, str) else None)


class Executor(Protocol):
    """Runs one phase of a job on a checkout the bot prepared and checked."""

    async def execute(self, spec: JobSpec, files: JobFiles, log: BinaryIO) -> Execution: ...


class LocalExecutor:
    """Runs the phase in the bot's own process, in the job's sandbox."""

    def __init__(self, terraform: Terraform) -> None:
        self.terraform = terraform

    async def execute(self, spec: JobSpec, files: JobFiles, log: BinaryIO) -> Execution:
        return await run_phase(self.terraform, spec, files, log)


async def run_phase(terraform: Terraform, spec: JobSpec, files: JobFiles, log: BinaryIO) -> Execution:
    """Init (unless a plan may reuse it), check what init installed, then plan or apply; in the sandbox."""
    project_dir = files.checkout / spec.project_dir
    env = {**spec.env, "HOME": str(files.scratch)}
    planfile = files.scratch / PLAN_FILE
    seconds = 0.0
    if spec.phase == "apply":
        # Before any of the job's code runs: then nothing can stand at that path (a link the
        # bot would write through).
        fd = os.open(planfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(spec.plan)
    init: PhaseResult | None = None
    if not (spec.phase == "plan" and spec.reuse_init and (project_dir / ".terraform").is_dir()):
        init = await terraform.init(project_dir, env, log, files)
        seconds += init.duration_s
        if failed := phase_failure("init", init):
            return Execution(init.output, seconds, failed)
    # What init installed, by terraform's own account, must stay in the checkout (checked on
    # every run: an earlier init of this pull request's working dir counts too).
    if problems := installed_module_problems(files.checkout.resolve(), project_dir):
        return Execution(init.output if init else "", seconds, "checkout refused: " + "; ".join(problems))
    if spec.phase == "apply":
        result = await terraform.apply(project_dir, planfile, env, log=log, files=files)
        seconds += result.duration_s
        return Execution(result.output, seconds, phase_failure("apply", result))
    result = await terraform.plan(project_dir, planfile, env, spec.workspace, log, files)
    if init is None and result.exit_code == 1 and not result.timed_out and "terraform init" in result.output:
        # The new commit changed modules, providers or the backend; terraform says so and
        # names init. (A pull request could print those words itself: it only buys an init.)
        log.write(b"\ndeploybot: terraform asks for init; running it and planning again\n")
        seconds += result.duration_s
        if not spec.lock_file_tracked:  # one init wrote for an earlier commit may pin what this one no longer allows
            (project_dir / LOCK_FILE).unlink(missing_ok=True)
        init = await terraform.init(project_dir, env, log, files)
        seconds += init.duration_s
        if failed := phase_failure("init", init):
            return Execution(init.output, seconds, failed)
        if problems := installed_module_problems(files.checkout.resolve(), project_dir):
            return Execution(init.output, seconds, "checkout refused: " + "; ".join(problems))
        result = await terraform.plan(project_dir, planfile, env, spec.workspace, log, files)
    seconds += result.duration_s
    if failed := phase_failure("plan", result, ok_codes=(0, 2)):
        return Execution(result.output, seconds, failed)
    try:
        plan = read_job_file(planfile, MAX_PLAN_BYTES)
    except OSError:  # none, a link, a FIFO, or too big
        return Execution(result.output, seconds, "terraform wrote no plan file the bot can use")
    return Execution(result.output, seconds, has_changes=result.exit_code == 2, plan=plan)


def phase_failure(phase: str, result: PhaseResult, ok_codes: tuple[int, ...] = (0,)) -> str:
    """Why a terraform command failed, or ""."""
    if result.timed_out:
        return f"terraform {phase} timed out after {result.duration_s:.0f}s and was stopped"
    if result.exit_code not in ok_codes:
        return f"terraform {phase} failed (exit {result.exit_code})"
    return ""
