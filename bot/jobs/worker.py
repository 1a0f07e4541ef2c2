"""The job runner: takes queued jobs from the store and runs terraform on them.

Up to `parallelism` jobs run at once; the store never hands out two jobs of one
project together. When the last job of a run ends, the run's comment and the
commit statuses are posted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

from bot.ci.runs import lock_refusal
from bot.config import Config
from bot.forges.vcs import ForgeError, VCSClient
from bot.jobs.apply_gate import apply_blockers
from bot.jobs.aws_credentials import CredentialsError, PhaseCredentials, PhaseRoles, session_name, with_credentials
from bot.jobs.executor import LOCK_FILE, Execution, JobSpec, LocalExecutor
from bot.jobs.git import KEEP_ON_RESET, GitError, RepoCache
from bot.jobs.repo_guard import cap_output, checkout_problems, tracked_paths
from bot.jobs.sandbox import JobFiles
from bot.jobs.terraform import Terraform, TerraformError, summarize_plan_file
from bot.logs import log_context
from bot.metrics import Metrics
from bot.models import PullRequest, Repo, plan_id
from bot.report.comments import (
    MARKER_ROOM,
    ProjectOutcome,
    marker_line,
    redact,
    render_run_comment,
    strip_ansi,
    with_marker,
)
from bot.report.statuses import plan_context, report_aggregate_statuses
from bot.runners.pools import RunnerLost, RunnerPools
from bot.store import Job, Run, SavedPlan, Store, StoreRetry, project_key, repo_key
from bot.store.backends import UNAVAILABLE as STORE_UNAVAILABLE
from policies.apply_requirements import merge_apply_refusals
from policies.policy import Policy

log = logging.getLogger("deploybot.worker")

ClientFactory = Callable[[Repo], VCSClient]

# What a job's summary starts with when it failed on a full data dir, and what counts as full.
DISK_FULL = "deploybot's disk is full"
LOW_DISK_BYTES = 1 << 20

FORGET_PULL = "forget-pull:"  # the topic replicas hear a closed pull request's working dirs go by

INTERRUPTED = (
    "the bot stopped while this apply was running, so it was not re-run; "
    "check the state, then `deploybot plan` again (the lock is kept)"
)


@dataclass
class JobOutcome:
    status: str  # succeeded | failed | refused
    summary: str
    output: str = ""
    has_changes: bool = False
    terraform_seconds: float = 0.0  # terraform's own time, to tell the bot's overhead apart
    plan_sha256: str = ""  # the plan a plan job saved, or an apply job applied

    def as_result(self) -> dict:
        return {"outcome": self.status, "summary": self.summary, "output": self.output,
                "has_changes": self.has_changes, "terraform_seconds": round(self.terraform_seconds, 3),
                "plan_sha256": self.plan_sha256}


class Worker:
    """Runs queued jobs until stopped."""

    def __init__(
        self,
        config: Config,
        store: Store,
        policy: Policy,
        clients: ClientFactory,
        repo_cache: RepoCache,
        terraform: Terraform,
        metrics: Metrics,
        notify_api_run: Callable[[Run, list[Job]], None] = lambda run, jobs: None,
        extra_secrets: Sequence[str] = (),
        runner_pools: RunnerPools | None = None,
    ) -> None:
        self.config = config
        self.extra_secrets = list(extra_secrets)  # secrets the config does not hold: CI callers' keys
        self.store = store
        self.policy = policy
        self.clients = clients
        self.repo_cache = repo_cache
        self.terraform = terraform
        self.local = LocalExecutor(terraform)
        # Jobs whose phase names a pool go to its runners; they wait there without a loop of ours.
        self.runner_pools = runner_pools or RunnerPools(store, {}, 30, 25)
        self._remote: set[asyncio.Task] = set()
        self.metrics = metrics
        self.notify_api_run = notify_api_run  # runs from the trigger API have no PR to comment on
        self.aws = PhaseCredentials(PhaseRoles(**dataclasses.asdict(config.aws)))
        self._wake = asyncio.Event()
        self._stopping = False
        self._running: dict[int, tuple[Job, asyncio.Task]] = {}
        self._stopped_by_shutdown: set[int] = set()  # jobs cancelled because the server stops
        self._loops: list[asyncio.Task] = []
        self._forgetting: set[asyncio.Task] = set()  # kept referenced until done
        # Outcomes are recorded once the store can be written again (a full disk), never dropped.
        self._stored = StoreRetry("the worker", lambda: self._stopping)

    # Lifecycle ------------------------------------------------------------------

    async def start(self, recovery: asyncio.Task) -> None:
        """Start the job loops; they first wait for `recovery`, the take-over of what a previous
        process left running (bot.jobs.replicas)."""
        self._loops = [
            asyncio.create_task(self._loop(recovery), name=f"worker-{i}")
            for i in range(self.config.terraform.parallelism)
        ]

    async def stop(self, grace: float) -> None:
        """Stop taking jobs: running plans go back to the queue for the next start, running
        applies get `grace` seconds to finish and are then stopped and reported interrupted."""
        self._stopping = True
        self._wake.set()
        for job, task in list(self._running.values()):
            if job.run.command == "plan":
                self._stopped_by_shutdown.add(job.id)
                task.cancel()
        if not self._loops:
            return
        _, pending = await asyncio.wait(self._loops + list(self._remote), timeout=grace)
        if pending:
            log.warning("%d apply(s) still running after %.0fs; stopping them", len(self._running), grace)
            for job, task in list(self._running.values()):
                self._stopped_by_shutdown.add(job.id)
                task.cancel()
            await asyncio.wait(self._loops + list(self._remote))

    def wake(self) -> None:
        """Tell idle loops that a job was queued."""
        self._wake.set()

    def cancel(self, jobs: list[Job]) -> None:
        """Stop running plans among these jobs (the store cancelled the queued ones).

        A running apply is never stopped halfway. Runs whose every job is now over
        get their comment, as if the last job had just finished.
        """
        for job in jobs:
            running = self._running.get(job.id)
            if running is not None and job.run.command == "plan":
                running[1].cancel()
        for run in {job.run.id: job.run for job in jobs}.values():
            asyncio.create_task(self._report_if_done(run))

    def report_run(self, run_id: int) -> None:
        """Report a run whose jobs ended outside the worker (an apply whose plan was rejected)."""
        jobs = self.store.run_jobs(run_id)
        if jobs:
            asyncio.create_task(self._report_if_done(jobs[0].run))

    async def take_over(self, grace: float) -> None:
        """Take over what replicas that died (or a process before this one) left: their plans are
        queued again, their applies reported interrupted (never re-run), and runs over for
        `grace` seconds whose report nobody alive posts are reported.

        Each take-over is conditional in the store: of two replicas at it at once, one acts.
        """
        for job in await self._stored("find orphaned jobs", self.store.orphaned_jobs):
            if job.run.command == "apply":
                taken = await self._stored(f"mark job {job.id} interrupted", lambda: self.store.finish_job(
                    job.id, "interrupted", JobOutcome("failed", INTERRUPTED).as_result(), attempt=job.attempt))
                if not taken:
                    continue
                self.store.drop_runner_leases(job_id=job.id)  # its runner, if any, stops
                log.warning("job %s (apply) was running on a replica that stopped: reported interrupted", job.id)
                await self._stored(f"audit job {job.id}", lambda: self.store.audit(
                    job.run.requested_by, "apply", "interrupted", job.run.repo.full_name,
                    job.project.label, job.run.head_sha, f"run {job.run.id}"))
                await self._report_if_done(job.run)
            elif await self._stored(f"re-queue job {job.id}", lambda: self.store.requeue_job(job)):
                self.store.drop_runner_leases(job_id=job.id)
                log.warning("job %s (plan) was running on a replica that stopped: queued again", job.id)
                self.wake()
        # A crash between a run's last job and its comment: report it now. Parts of the comment
        # posted before the crash are found by their markers and not posted again.
        for run in await self._stored("find unreported runs", lambda: self.store.unreported_runs(grace)):
            await self._report_if_done(run, recovering=True)

    async def _loop(self, recovery: asyncio.Task) -> None:
        try:
            await recovery
            while not self._stopping:
                job = await self._stored("claim a job", self.store.claim_next_job)
                if job is None:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                    except asyncio.TimeoutError:
                        pass
                    continue
                # Wake a sibling: there may be more runnable jobs than this one.
                self._wake.set()
                if job.project.pool(job.run.command):
                    task = asyncio.create_task(self._run_job(job), name=f"job-{job.id}")
                    self._remote.add(task)
                    task.add_done_callback(self._remote.discard)
                    continue
                await self._run_job(job)
        except STORE_UNAVAILABLE:
            if not self._stopping:
                raise
            # Stopped while the store could not be written: a job not yet recorded stays
            # `running`, and the next start re-queues it (a plan) or reports it interrupted (an apply).

    # One job ------------------------------------------------------------------

    def _files(self, job: Job) -> JobFiles:
        """What the job's terraform may see: its checkout, and a scratch dir of its own (HOME, plan file)."""
        return JobFiles(checkout=self._workdir(job), scratch=self.config.server.data_dir / "jobs" / f"job-{job.id}")

    async def _run_job(self, job: Job) -> None:
        with log_context(run=job.run.id, job=job.id, repo=job.run.repo.full_name,
                         pr=job.run.pull_number or None, project=job.project.label):
            output_log = JobLog(self.store, job.id)
            try:
                await self._run_logged_job(job, output_log)
            finally:
                await output_log.aclose()
                shutil.rmtree(self._files(job).scratch, ignore_errors=True)

    async def _run_logged_job(self, job: Job, output_log: JobLog) -> None:
        started = time.monotonic()
        task = asyncio.create_task(self._execute(job, output_log))
        self._running[job.id] = (job, task)
        try:
            outcome = await task
            status = "succeeded" if outcome.status == "succeeded" else "failed"
        except RunnerLost as exc:
            # As if the bot had stopped while the job ran: a plan runs again, an apply is not re-run.
            log.warning("job %s: %s", job.id, exc)
            if job.run.command == "plan":
                self.store.requeue_job(job)
                self._running.pop(job.id, None)
                self.wake()
                return
            outcome, status = JobOutcome("failed", f"{INTERRUPTED} ({exc})"), "interrupted"
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
            if job.id in self._stopped_by_shutdown:
                if job.run.command == "plan":
                    self.store.requeue_job(job)  # planned again after the restart
                    self._running.pop(job.id, None)
                    return
                outcome, status = JobOutcome("failed", INTERRUPTED), "interrupted"
            else:
                outcome, status = JobOutcome("failed", "cancelled"), "cancelled"
        except Exception as exc:  # the comment says what failed; the traceback stays in our log
            if _disk_full_error(exc):  # the bot's own files or store, not a bug: no traceback needed
                log.error("job %s failed: %s", job.id, exc)
                outcome = JobOutcome("failed", f"{DISK_FULL} ({_reason(exc)})")
            else:
                log.exception("job %s failed unexpectedly", job.id)
                outcome = JobOutcome("failed", "internal error: see the deploybot log")
            status = "failed"
        finally:
            self._running.pop(job.id, None)
        await output_log.aclose()  # all of the log is in the store before the job is seen to end
        if status == outcome.status == "failed" and not outcome.summary.startswith(DISK_FULL) and disk_is_full(self.config.server.data_dir):
            # Then that is the likely cause, and not every tool says so: terraform 1.0 exits 0
            # with an empty plan file when the disk fills just as it saves the plan.
            outcome.summary = f"{DISK_FULL}: {outcome.summary}"
        log.info("job %s %s %s on %s#%s: %s (%s), terraform %.2fs", job.id, job.run.command,
                 job.project.label, job.run.repo.full_name, job.run.pull_number, status,
                 outcome.summary, outcome.terraform_seconds)
        result = outcome.as_result()
        self.metrics.job_seconds.labels(job.run.command, result["outcome"] if status == "failed" else status
                                        ).observe(time.monotonic() - started)
        result["output"] = cap_output(self.clean(result["output"]))  # redact first: a cut must not split a secret
        result["summary"] = self.clean(result["summary"])
        # On a full disk these wait for room: the job stays `running` meanwhile, so nothing else
        # of its project starts, and the pull request hears of it once it is recorded.
        if not await self._stored(f"record job {job.id}",
                                  lambda: self.store.finish_job(job.id, status, result, attempt=job.attempt)):
            # This replica was given up as dead while the job ran (it could not reach the store
            # for a lease): another replica queued the job again or reported it interrupted.
            log.error("job %s was taken over by another replica while it ran here: this outcome (%s) is dropped",
                      job.id, status)
            return
        run = job.run
        await self._stored(f"audit job {job.id}", lambda: self.store.audit(
            run.requested_by, run.command, result.get("outcome") if status == "failed" else status,
            run.repo.full_name, job.project.label, run.head_sha,
            f"{run.trigger} run {run.id}" + (f" on #{run.pull_number}" if run.pull_number else "")
            + f": {result['summary']}"))
        project_status = []
        if job.run.command == "plan" and self._project_statuses(job.run):
            project_status.append(self._set_status(job.run.repo, job.run.head_sha, plan_context(job.project.label),
                                                    "success" if status == "succeeded" else "failure",
                                                    result["summary"]))
        # The project's status and the run's report (comment, overall statuses) go out together.
        await asyncio.gather(*project_status, self._report_if_done(job.run))

    async def _execute(self, job: Job, output_log: BinaryIO) -> JobOutcome:
        # A CI run steps aside for a pull request that locked the project after it was queued.
        if not job.run.pull_number and (reason := lock_refusal(self.store, job.project_key, job.project.label)):
            return JobOutcome("refused", f"{job.run.command} refused: {reason}")
        if job.run.command == "plan":
            # Said while the checkout and terraform run: the forge call need not hold them up.
            announced = asyncio.create_task(self._set_status(
                job.run.repo, job.run.head_sha, plan_context(job.project.label), "pending", "planning…")
                if self._project_statuses(job.run) else asyncio.sleep(0))
            try:
                return await self._plan(job, output_log)
            finally:
                await announced  # before the job's own status, which must come last
        if job.run.trigger == "api-merge":
            # Apply-on-merge from CI: plan the merged SHA and apply that very plan.
            planned = await self._plan(job, output_log)
            if planned.status != "succeeded" or not planned.has_changes:
                return planned
        return await self._apply(job, output_log)

    def _project_statuses(self, run: Run) -> bool:
        """Whether the run sets a status per project: not above the policy's project_statuses_max,
        where the aggregate statuses say it all in a few writes."""
        policy = self.policy.repo(run.repo.full_name)
        limit = policy.project_statuses_max if policy is not None else 0
        return self.store.run_size(run.id) <= limit

    def _project_dir(self, kind: str, project_key: str) -> Path:
        """Where a project's working dirs ("work") or saved plans ("plans") are kept."""
        return self.config.server.data_dir / kind / re.sub(r"[^A-Za-z0-9._-]", "_", project_key)

    def _workdir(self, job: Job) -> Path:
        return self._project_dir("work", job.project_key) / f"pr-{job.run.pull_number}"

    def forget_pull_soon(self, repo: Repo, pull_number: int, tell_replicas: bool = True) -> None:
        """`forget_pull` in a task of its own; and on every other replica, whose working dirs
        of the pull request are caches of their own."""
        if tell_replicas:
            self.store.announce(FORGET_PULL + json.dumps({"repo": dataclasses.asdict(repo), "pull": pull_number,
                                                          "by": self.store.replica}))
        task = asyncio.create_task(self.forget_pull(repo, pull_number))
        self._forgetting.add(task)
        task.add_done_callback(self._forgetting.discard)

    async def forget_pull(self, repo: Repo, pull_number: int) -> None:
        """Remove a closed pull request's working dirs and plan files, once none of its jobs runs.

        Its plans were cancelled just before (they stop within `kill_grace`); a merge's
        apply calls this itself when it is reported.
        """
        repo_id = repo_key(repo)
        while any(repo_key(job.run.repo) == repo_id and job.run.pull_number == pull_number
                  for job, _ in self._running.values()):
            await asyncio.sleep(0.2)
        policy = self.policy.repo(repo.full_name)
        for project in policy.projects if policy else ():
            key = project_key(repo, project)
            await asyncio.to_thread(shutil.rmtree, self._project_dir("work", key) / f"pr-{pull_number}", True)
            for planfile in self._project_dir("plans", key).glob(f"pr-{pull_number}-*.tfplan"):
                planfile.unlink(missing_ok=True)

    async def _checkout(self, job: Job, keep: Sequence[str]) -> Path | JobOutcome:
        """The project's directory in a checkout of exactly the run's head SHA; or why not."""
        try:
            return await self._checkout_project(job, keep)
        except ProjectDirError as exc:
            return JobOutcome("failed", str(exc))
        except (GitError, ForgeError) as exc:
            return JobOutcome("failed", f"checkout failed: {exc}")

    async def _checkout_project(self, job: Job, keep: Sequence[str]) -> Path:
        run = job.run
        client = self.clients(run.repo)
        header = await asyncio.to_thread(client.git_auth_header)
        await self.repo_cache.fetch(repo_key(run.repo), run.repo.clone_url, run.head_sha, header)
        checkout = await self.repo_cache.checkout(repo_key(run.repo), run.head_sha, self._workdir(job), keep)
        root = checkout.resolve()
        project_dir = (checkout / job.project.dir).resolve()
        # A symlinked project dir in the PR must not lead the bot outside the clone.
        if project_dir != root and root not in project_dir.parents:
            raise ProjectDirError(f"checkout refused: `{job.project.dir}` points outside the repository")
        if not project_dir.is_dir():
            raise ProjectDirError(f"checkout refused: `{job.project.dir}` does not exist at {run.head_sha[:8]}")
        if problems := checkout_problems(root, project_dir):
            raise ProjectDirError("checkout refused: " + "; ".join(problems))
        return project_dir

    async def _run_phase(self, job: Job, phase: str, output_log: BinaryIO, plan: bytes = b"") -> Execution:
        """Checkout → sandbox → terraform, through the job's executor: the bot's own, or a runner pool's.

        A plan in the bot reuses its pull request's working dir and what init installed there
        (terraform itself asks for init when the new commit needs it); an apply, and every job
        of a runner, starts from a clean checkout, so nothing a plan left there runs with the
        apply role.
        """
        pool = job.project.pool(job.run.command)
        reuse_init = phase == "plan" and not pool
        try:
            env = await self._phase_env(job, phase, assume_role=not pool)
        except CredentialsError as exc:
            return Execution("", failure=f"AWS credentials for {phase}: {exc}")
        project_dir = await self._checkout(job, KEEP_ON_RESET if reuse_init else ())
        if isinstance(project_dir, JobOutcome):
            return Execution(project_dir.output, failure=project_dir.summary)
        files = self._files(job)
        await asyncio.to_thread(shutil.rmtree, files.scratch, True)
        files.scratch.mkdir(parents=True)
        if not pool:
            await asyncio.to_thread(self.terraform.settings.sandbox.hand_over, files)
        relative = project_dir.relative_to(files.checkout.resolve()).as_posix()
        tracked = await asyncio.to_thread(tracked_paths, files.checkout) or set()  # a big index: off the loop
        spec = JobSpec(job.id, phase, relative, job.project.workspace, env, plan, reuse_init,
                       lock_file_tracked=posixpath.normpath(posixpath.join(relative, LOCK_FILE)) in tracked)
        executor = self.runner_pools.executor(pool) if pool else self.local
        return await executor.execute(spec, files, output_log)

    async def _phase_env(self, job: Job, phase: str, assume_role: bool) -> dict[str, str]:
        """The phase's environment: server config, plus short-lived credentials of the phase's role
        when the bot runs the job itself (a runner brings its own role).

        Raises CredentialsError; the session name tells CloudTrail who caused what.
        """
        run = job.run
        phase_env = self.config.terraform.plan_env if phase == "plan" else self.config.terraform.apply_env
        if not assume_role:
            return dict(phase_env)
        name = session_name(phase, run.repo.full_name, run.pull_number or f"run{run.id}", run.requested_by)
        timeout = self.config.terraform.plan_timeout if phase == "plan" else self.config.terraform.apply_timeout
        credentials = await asyncio.to_thread(self.aws.env_for, phase, name, valid_for=timeout)
        return with_credentials(phase_env, credentials)

    async def _plan(self, job: Job, output_log: BinaryIO) -> JobOutcome:
        execution = await self._run_phase(job, "plan", output_log)
        if not execution.ok:
            return JobOutcome("failed", execution.failure, execution.output,
                              terraform_seconds=execution.terraform_seconds)
        plan = execution.plan
        if plan is None:  # a runner that said it succeeded but sent none
            return JobOutcome("failed", "the plan file never reached the bot", execution.output,
                              terraform_seconds=execution.terraform_seconds)
        # Counted from the plan's bytes the bot holds, never from output text a PR could forge.
        try:
            summary = summarize_plan_file(plan)
        except TerraformError as exc:
            return JobOutcome("failed", str(exc), execution.output, terraform_seconds=execution.terraform_seconds)
        # Kept in the store, out of every job's reach; hashed from the bytes the bot holds.
        digest = hashlib.sha256(plan).hexdigest()
        replaced = self.store.save_plan(SavedPlan(job.project_key, job.run.pull_number, job.run.head_sha,
                                                  "", digest, summary.has_changes), plan)
        if replaced is not None and replaced.planfile:
            Path(replaced.planfile).unlink(missing_ok=True)  # saved by an earlier release
        text = f"{summary.text} (plan `{plan_id(digest)}`)" if summary.has_changes else summary.text
        return JobOutcome("succeeded", text, execution.output, summary.has_changes,
                          execution.terraform_seconds, digest)

    async def _apply(self, job: Job, output_log: BinaryIO) -> JobOutcome:
        run = job.run
        # Read once: the refusals judge exactly the plan that is then applied.
        plan = self.store.get_plan(job.project_key, run.pull_number)
        if run.pull_number:
            client = self.clients(run.repo)
            try:
                pull = await asyncio.to_thread(client.get_pull_request, run.pull_number)
            except ForgeError as exc:
                return JobOutcome("refused", f"apply refused: could not check the apply requirements: {exc}")
            reasons = await asyncio.to_thread(self._apply_refusals, client, pull, job, plan)
        else:
            reasons = self._api_apply_refusals(job, plan)
        if reasons:
            return JobOutcome("refused", "apply refused: " + "; ".join(reasons))
        assert plan is not None  # the refusals checked it
        # The job gets a copy of the very bytes that were approved, and no other plan. Only
        # now, after every refusal check, is the deploy role assumed.
        # Read once, hash checked: what the job gets is what is checked.
        approved = await asyncio.to_thread(self.store.plan_content, plan)
        if approved is None:
            return JobOutcome("refused", "apply refused: the saved plan is missing or was changed — plan again")
        execution = await self._run_phase(job, "apply", output_log, approved)
        if not execution.ok:
            return JobOutcome("failed", execution.failure, execution.output,
                              terraform_seconds=execution.terraform_seconds)
        self.store.delete_plan(job.project_key, run.pull_number)
        return JobOutcome("succeeded", f"applied plan `{plan_id(plan.sha256)}`", execution.output,
                          terraform_seconds=execution.terraform_seconds, plan_sha256=plan.sha256)

    def _apply_refusals(self, client: VCSClient, pull: PullRequest, job: Job, plan: SavedPlan | None) -> list[str]:
        """Why this apply must not run; checked when the job starts, not when it was asked for."""
        if plan is None:
            return ["there is no saved plan — comment `deploybot plan` first"]
        if plan.head_sha != pull.head_sha:
            return [f"the plan is for {plan.head_sha[:8]} but the pull request is now at "
                    f"{pull.head_sha[:8]} — comment `deploybot plan` again"]
        repo_policy = self.policy.repo(pull.repo.full_name)
        if repo_policy is None:
            return ["this repository is not in the deploybot policy"]
        if job.run.trigger == "merge":
            # The merge itself is the approval, so it must be a merge the policy trusts,
            # as the forge API reports it now (never the webhook's word).
            return merge_apply_refusals(repo_policy, pull)
        return apply_blockers(client, self.store, repo_policy, pull, job.project)

    def _api_apply_refusals(self, job: Job, plan: SavedPlan | None) -> list[str]:
        """Why an apply started from the trigger API must not run: its plan and its approval."""
        if plan is None or plan.head_sha != job.run.head_sha:
            return [f"there is no saved plan of {job.project.label} for {job.run.head_sha[:8]}"]
        if job.run.trigger == "api-merge":
            return []  # planned just now from a commit on the default branch
        plan_job = self.store.api_plan_job(job.project_key, job.run.head_sha)
        decision = self.store.decision(plan_job.run.id) if plan_job else None
        if decision is None or decision["state"] != "approved":
            return ["the plan has not been approved"]
        if plan_job.result.get("plan_sha256") != plan.sha256:
            return ["the saved plan is not the plan that was approved — plan again"]
        return []

    def clean(self, text: str) -> str:
        """Output as users may see it: no colour codes, no secrets of the bot."""
        return redact(strip_ansi(text), self.config.secrets() + self.aws.secrets() + self.extra_secrets)

    # Reporting ------------------------------------------------------------------

    async def _report_if_done(self, run: Run, recovering: bool = False) -> None:
        if not await self._stored(f"claim the report of run {run.id}", lambda: self.store.claim_run_report(run.id)):
            return
        jobs = self.store.run_jobs(run.id)
        if not run.pull_number:
            await asyncio.to_thread(self.notify_api_run, run, jobs)
            await self._stored(f"record the report of run {run.id}", lambda: self.store.finish_run_report(run.id))
            return
        outcomes = [
            ProjectOutcome(
                label=job.project.label,
                status="refused" if job.result.get("outcome") == "refused" else job.status,
                summary=job.result.get("summary", ""),
                output=job.result.get("output", ""),
            )
            for job in jobs
        ]
        if run.trigger == "merge":
            # The merged pull request is done with its projects once its apply has run.
            for lock in self.store.locks_for_pull(run.repo, run.pull_number):
                await self._stored(f"unlock {lock.project_key}",
                                   lambda: self.store.unlock(lock.project_key, run.pull_number))
            self.forget_pull_soon(run.repo, run.pull_number)
        footer = _footer(run, jobs)
        client = self.clients(run.repo)
        try:
            posted = None
            bodies = render_run_comment(run.command, run.head_sha, outcomes, footer, client.comment_limit - MARKER_ROOM)
            for part, body in enumerate(bodies, 1):
                marker = f"run {run.id} part {part}"
                found = (await asyncio.to_thread(client.find_comment, run.pull_number, marker_line(marker))
                         if recovering else None)
                posted = found or await asyncio.to_thread(client.create_comment, run.pull_number,
                                                          with_marker(body, marker))
            if run.command == "plan" and posted is not None:
                await self._mark_shown(run, jobs, posted.created_at)
            await asyncio.to_thread(report_aggregate_statuses, client, self.store, run)
            await self._stored(f"record the report of run {run.id}", lambda: self.store.finish_run_report(run.id))
        except ForgeError as exc:
            self.metrics.forge_errors.labels(run.repo.forge).inc()
            detail = f"run {run.id} on #{run.pull_number}: {exc}"
            await self._stored(f"audit the report of run {run.id}", lambda: self.store.audit(
                "deploybot", f"report-{run.command}", "failed", run.repo.full_name,
                sha=run.head_sha, detail=detail))
            log.error("could not report run %s on %s#%s: %s", run.id, run.repo.full_name,
                      run.pull_number, exc)

    async def _mark_shown(self, run: Run, jobs: list[Job], shown_at: str) -> None:
        """From now on the run's plans may be approved: the forge's time their comment was posted.

        A plan never shown (its comment could not be posted) can never be approved.
        """
        for job in jobs:
            digest = job.result.get("plan_sha256")
            if job.status == "succeeded" and digest and shown_at:
                await self._stored(f"record plan {plan_id(digest)} shown", lambda job=job, digest=digest:
                                   self.store.mark_plan_shown(job.project_key, run.pull_number, digest, shown_at))

    async def _set_status(self, repo: Repo, sha: str, context: str, state: str, description: str) -> None:
        client = self.clients(repo)
        try:
            await asyncio.to_thread(client.set_status, sha, context, state, description)
        except ForgeError as exc:
            self.metrics.forge_errors.labels(repo.forge).inc()
            log.error("could not set status %s on %s@%s: %s", context, repo.full_name, sha[:8], exc)


class ProjectDirError(Exception):
    """The project directory is missing or leads outside the checkout."""


class JobLog:
    """A job's output, written as terraform prints it: kept in the store, so that whichever
    replica is asked can show it while it grows (the trigger API's log, the run's page).

    Written from the event loop and sent to the store twice a second, off the loop. It is the
    one copy of the output that may be lost: when the store cannot take it, it stops (said
    once in our log) and the job goes on, its output kept in memory for the comment.
    """

    FLUSH_SECONDS = 0.5

    def __init__(self, store: Store, job_id: int) -> None:
        self.store = store
        self.job_id = job_id
        self._pending = bytearray()
        self._working = True
        self._flusher = asyncio.create_task(self._flush_every(), name=f"job-{job_id}-log")

    def write(self, data: bytes) -> int:
        if self._working:
            self._pending += data
        return len(data)

    def flush(self) -> None:
        """Sent by the flusher, not here: a write never waits for the store."""

    async def aclose(self) -> None:
        """Send what is left and stop."""
        self._flusher.cancel()
        await asyncio.gather(self._flusher, return_exceptions=True)
        await self._send()
        self._working = False

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(self.FLUSH_SECONDS)
            await self._send()

    async def _send(self) -> None:
        if not self._pending or not self._working:
            return
        data = bytes(self._pending)
        self._pending.clear()
        try:
            await asyncio.to_thread(self.store.append_job_log, self.job_id, data)
        except STORE_UNAVAILABLE as exc:
            log.warning("the job's log stops here: %s", exc)
            self._working = False


def disk_is_full(path: Path) -> bool:
    """Whether the file system holding `path` has (next to) no room left."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize < LOW_DISK_BYTES


def _disk_full_error(exc: BaseException) -> bool:
    """Whether an error is the bot's disk being full (its files or its store)."""
    if isinstance(exc, sqlite3.OperationalError):
        return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_FULL  # the primary code
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _reason(exc: BaseException) -> str:
    """The system's words for a disk error, without the path."""
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def _footer(run: Run, jobs: list[Job]) -> str:
    if run.command == "plan" and any(j.result.get("has_changes") for j in jobs):
        return "To apply, get the required approvals, then comment `deploybot apply`."
    return ""
