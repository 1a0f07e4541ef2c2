"""Runs asked for by CI servers through the trigger API, and the approvals they wait for.

Deny by default: a caller names a repo, a ref and a project; the policy must
grant exactly that; the bot resolves the ref itself on the forge and fetches the
code from there. Nothing else a caller sends (no arguments, no environment, no
code) reaches terraform.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from bot.ci.auth import sha_claim_matches
from bot.forges.vcs import ForgeError, VCSClient
from bot.jobs.apply_gate import may
from bot.models import Project, Repo, plan_id
from bot.store import FINISHED, Job, Store, project_key
from policies.callers import Caller, authorize_trigger
from policies.policy import Policy, select_projects

RUN_FIELDS = ("repo", "forge", "ref", "sha", "project", "dir", "workspace", "command")
_SHA = re.compile(r"[0-9a-f]{40}")
_SAFE_NAME = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._/-]{0,254}")


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: valid JSON, not valid text
        return False
    return True


class ApiError(Exception):
    """A refusal the API answers with `status` and a message safe to show the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RunRequest:
    """What a CI server may ask for: nothing but these fields."""

    repo: str
    command: str
    ref: str | None = None
    sha: str | None = None
    project: str | None = None
    dir: str | None = None
    workspace: str | None = None
    forge: str | None = None


def parse_run_request(body: bytes) -> RunRequest:
    """Validate a `POST /api/v1/runs` body; raise ApiError(400) for anything else."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ApiError(400, "the body is not JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    unknown = sorted(set(data) - set(RUN_FIELDS))
    if unknown:
        shown = ", ".join(name.encode("utf-8", "replace").decode() for name in unknown)[:200]
        raise ApiError(400, f"unknown field(s): {shown}; accepted: {', '.join(RUN_FIELDS)}")
    for name, value in data.items():
        if value is not None and (not isinstance(value, str) or not value.isprintable()
                                  or not _encodable(value)):
            raise ApiError(400, f"{name} must be a printable string")
    fields = {k: v for k, v in data.items() if v not in (None, "")}
    if not fields.get("repo"):
        raise ApiError(400, "repo is required")
    if fields.get("command") not in ("plan", "apply"):
        raise ApiError(400, "command must be plan or apply")
    if fields.get("forge", "github") not in ("github", "gitlab"):
        raise ApiError(400, "forge must be github or gitlab")
    for name in ("ref", "dir", "workspace", "project"):
        if name in fields and (not _SAFE_NAME.fullmatch(fields[name]) or ".." in fields[name]):
            raise ApiError(400, f"{name} may hold only letters, digits and ._/- (and no ..)")
    request = RunRequest(**fields)
    if not (request.ref or request.sha):
        raise ApiError(400, "give ref or sha")
    if request.sha and not _SHA.fullmatch(request.sha):
        raise ApiError(400, "sha must be a full 40-character commit SHA")
    if not (request.project or request.dir):
        raise ApiError(400, "give project, or dir (and workspace)")
    return request


def full_ref(ref: str | None) -> str | None:
    """`main` means the branch `refs/heads/main`."""
    if ref is None or ref.startswith("refs/"):
        return ref
    return f"refs/heads/{ref}"


def lock_refusal(store: Store, key: str, label: str) -> str | None:
    """Why a CI run of a project must not run now: a pull request holds its lock. None if none does.

    CI runs (pull number 0) take no lock; they step aside while a pull request holds the
    project between its plan and its apply, merge or close, so a deploy from CI never lands
    under a plan that is being reviewed. Asked when a run is requested and when a plan is
    approved (which releases the applies waiting for it).
    """
    lock = store.lock_holder(key)
    if lock is None:
        return None
    return (f"{label} is locked by #{lock.pull_number} (planned by @{lock.holder}); try again once that "
            "pull request is merged or closed, or after `deploybot unlock` on it")


@dataclass
class ApiRuns:
    """The trigger API's decisions, with the forge and store at hand (blocking: run in a thread)."""

    store: Store
    policy: Policy
    lookup_repo: Callable[[str, str], Repo]  # (forge, full name) -> Repo, from the forge API
    client_for: Callable[[Repo], VCSClient]
    default_forge: str
    forges: frozenset[str]  # the forges this server serves
    wake_workers: Callable[[], None]
    cancel_run: Callable[[int], None]  # report a run whose waiting job was rejected

    def start(self, caller: Caller, claims: dict[str, Any], request: RunRequest) -> dict[str, Any]:
        """Queue the run the caller asked for, or raise ApiError saying why not."""
        audit = dict(actor=f"caller:{caller.name}", action=f"api-{request.command}", repo=request.repo)
        try:
            run_id, status = self._start(caller, claims, request, audit)
        except ApiError as exc:
            self.store.audit(outcome="refused", detail=str(exc), **audit)
            raise
        self.store.audit(outcome=status, detail=f"run {run_id}", **audit)
        return {"id": run_id, "status": status}

    def _start(self, caller: Caller, claims: dict[str, Any], request: RunRequest,
               audit: dict[str, str]) -> tuple[int, str]:
        repo_policy = self.policy.repo(request.repo)
        if repo_policy is None:
            raise ApiError(403, f"{request.repo} is not allow-listed")
        projects = select_projects(repo_policy, name=request.project, dir=request.dir,
                                   workspace=request.workspace)
        if len(projects) != 1:
            raise ApiError(400, "the request must name exactly one allow-listed project")
        project = projects[0]
        audit["project"] = project.label
        ref = full_ref(request.ref)
        # GitHub's `ref` claim is a full ref; GitLab's is short, with the full one in `ref_path`.
        token_ref = full_ref(claims.get("ref_path") or claims.get("ref"))
        if ref and token_ref and token_ref != ref:
            raise ApiError(403, "the token was issued for another ref")
        if reason := authorize_trigger(caller, request.repo, project, request.command, ref):
            raise ApiError(403, reason)
        forge = request.forge or self.default_forge
        if forge not in self.forges:
            raise ApiError(400, f"{forge} is not configured on this server")
        try:
            repo = self.lookup_repo(forge, request.repo)
            client = self.client_for(repo)
            sha = self._resolve(client, ref, request.sha)
        except ForgeError as exc:
            raise ApiError(502, f"the forge could not be asked: {exc}") from None
        audit["sha"] = sha
        if claims and "sha" in claims and not sha_claim_matches(claims, sha):
            raise ApiError(403, "the token was issued for another commit")
        if reason := lock_refusal(self.store, project_key(repo, project), project.label):
            raise ApiError(409, reason)
        key = f"api:{uuid.uuid4()}"
        if request.command == "plan":
            run = self.store.add_run(key, repo, 0, sha, "plan", "api", caller.name, [project])
            assert run is not None
            self.wake_workers()
            return run.id, "queued"
        return self._start_apply(key, caller, repo, client, sha, project,
                                 repo_policy.apply_on_merge)

    def _resolve(self, client: VCSClient, ref: str | None, sha: str | None) -> str:
        resolved = client.commit_sha(ref or sha or "")
        if resolved is None:
            raise ApiError(404, f"{ref or sha} does not exist in the repository")
        if sha and resolved != sha:
            raise ApiError(409, f"{ref} is at {resolved[:8]}, not at {sha[:8]}")
        return resolved

    def _start_apply(self, key: str, caller: Caller, repo: Repo, client: VCSClient, sha: str,
                     project: Project, apply_on_merge: bool) -> tuple[int, str]:
        plan_job = self.store.api_plan_job(project_key(repo, project), sha)
        if plan_job is not None:
            decision = self.store.decision(plan_job.run.id)
            if decision is not None and decision["state"] == "rejected":
                raise ApiError(409, f"the plan of {sha[:8]} (run {plan_job.run.id}) was rejected")
            approved = decision is not None
            run = self.store.add_run(key, repo, 0, sha, "apply", "api", caller.name, [project],
                                     job_status="queued" if approved else "waiting")
            assert run is not None
            if approved:
                self.wake_workers()
            return run.id, "queued" if approved else "awaiting_approval"
        if apply_on_merge and client.is_on_default_branch(sha):
            run = self.store.add_run(key, repo, 0, sha, "apply", "api-merge", caller.name, [project])
            assert run is not None
            self.wake_workers()
            return run.id, "queued"
        raise ApiError(409, f"there is no plan of {project.label} at {sha[:8]}: run plan first")

    def decide(self, run_id: int, approve: bool, login: str, via: str) -> str:
        """Approve or reject a plan run as `login`; return what happened, or raise ApiError.

        Every refusal is audited with its reason.
        """
        action = "approve" if approve else "reject"
        try:
            job, detail = self._decide(run_id, approve, login, via)
        except ApiError as exc:
            jobs = self.store.run_jobs(run_id)
            where = dict(repo=jobs[0].run.repo.full_name, project=jobs[0].project.label,
                         sha=jobs[0].run.head_sha) if jobs else {}
            self.store.audit(actor=f"{via}:{login}", action=action, outcome="refused", detail=str(exc), **where)
            raise
        self.store.audit(actor=f"{via}:{login}", action=action, outcome="approved" if approve else "rejected",
                         repo=job.run.repo.full_name, project=job.project.label, sha=job.run.head_sha,
                         detail=detail)
        for waiting in self.store.waiting_jobs(job.project_key, job.run.head_sha):
            if approve:
                self.store.release_job(waiting.id)
            else:
                self.store.finish_job(waiting.id, "cancelled", {
                    "outcome": "rejected", "summary": f"the plan was rejected by {login}", "output": ""})
                self.cancel_run(waiting.run.id)
        if approve:
            self.wake_workers()
        return "approved" if approve else "rejected"

    def _decide(self, run_id: int, approve: bool, login: str, via: str) -> tuple[Job, str]:
        """Record `login`'s decision on the plan of run `run_id` if they may make it.

        Return the plan's job and what the audit log says of it; raise ApiError saying why not.
        """
        jobs = self.store.run_jobs(run_id)
        if not jobs or jobs[0].run.trigger != "api" or jobs[0].run.command != "plan":
            raise ApiError(404, f"run {run_id} is not a plan started from the trigger API")
        job = jobs[0]
        action = "approve" if approve else "reject"
        digest = job.result.get("plan_sha256")
        if job.status != "succeeded" or not job.result.get("has_changes") or not digest:
            raise ApiError(409, f"run {run_id} has no plan with changes to {action}")
        if (decision := self.store.decision(run_id)) is not None:
            raise ApiError(409, f"run {run_id} was already decided: {decision['state']}")
        saved = self.store.get_plan(job.project_key, 0)
        newest = self.store.api_plan_job(job.project_key, job.run.head_sha)
        if saved is None or saved.sha256 != digest or newest is None or newest.id != job.id:
            # A newer plan of the project replaced this one (even a byte-identical one), or it
            # was applied: a decision is of the plan the approver was shown, and an apply asks
            # only for the decision on the newest plan.
            raise ApiError(409, f"plan {plan_id(digest)} of run {run_id} is no longer the saved plan of "
                                f"{job.project.label}: decide on the newest plan run")
        if approve and (reason := lock_refusal(self.store, job.project_key, job.project.label)):
            raise ApiError(409, reason)  # the applies waiting for this approval would start under the lock
        repo_policy = self.policy.repo(job.run.repo.full_name)
        client = self.client_for(job.run.repo)
        try:
            if repo_policy is None or not may(client, login, repo_policy.approvers):
                raise ApiError(403, f"{login} is not an approver of {job.run.repo.full_name}")
            # Four eyes, as for pull requests: whoever wrote the commit never approves its deploy.
            if approve and "committers" in repo_policy.approvers_exclude:
                writers = {person.lower() for person in client.commit_author_logins(job.run.head_sha)}
                if login.lower() in writers:
                    raise ApiError(403, f"{login} authored or committed {job.run.head_sha[:8]} and cannot "
                                        "approve its plan: another approver must")
        except ForgeError as exc:
            raise ApiError(502, f"could not check the approver with the forge: {exc}") from None
        if not self.store.decide(run_id, approve, login, via):  # another decision came first
            raise ApiError(409, f"run {run_id} was already decided: {self.store.decision(run_id)['state']}")
        return job, f"run {run_id}, plan {plan_id(digest)}"


def run_view(store: Store, job: Job, output: str) -> dict[str, Any]:
    """How `GET /api/v1/runs/{id}` shows a run.

    `plan_id` names the plan the run saved (a plan) or applied (an apply), as the plan
    comment, the Slack message and `approve <plan-id>` do; null until there is one.
    """
    digest = job.result.get("plan_sha256")
    status = {"waiting": "awaiting_approval"}.get(job.status, job.status)
    outcome = job.result.get("outcome")
    if job.status in FINISHED and outcome in ("refused", "rejected"):
        status = outcome
    decision = store.decision(job.run.id) if job.run.command == "plan" else None
    if job.run.command == "apply" and job.status == "waiting":
        decision = {"state": "pending"}
    return {
        "id": job.run.id,
        "repo": job.run.repo.full_name,
        "sha": job.run.head_sha,
        "project": job.project.label,
        "command": job.run.command,
        "requested_by": job.run.requested_by,
        "status": status,
        "summary": job.result.get("summary", ""),
        "has_changes": bool(job.result.get("has_changes")),
        "plan_id": plan_id(digest) if digest else None,
        "output": output,
        "approval": decision,
    }
