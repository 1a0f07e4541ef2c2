"""Benchmarks 2 (plan overhead) and 3 (fan-out).

Both drive the local GitHub fake the way people drive GitHub (push a branch, open a
pull request, push again) and time from the moment the fake starts sending the
webhook to the moment the bot's plan comment reaches the fake's API. The bot runs as
`deploybot serve` in its own process; the fake runs in this one, with timestamps on
every webhook, API request and comment (bench.common.ForgeRecorder).

Plan overhead: the sandbox's repository (staging, production, a shared module).
Each round opens a new pull request changing `staging` (a fresh checkout and working
dir: "cold" for the bot, though its shared plugin cache is warm after the unmeasured
warm-up) and then pushes to it ("warm": same working dir, `.terraform` kept), and
runs a bare `terraform init && terraform plan` of a fresh copy of the same project
with no plugin cache; the order of bot and bare alternates between rounds. The bot's
own terraform time is read from the store (`jobs.result.terraform_seconds`: init +
plan); overhead = webhook-to-comment minus that.

A traced round then runs once more with the bot's git and terraform wrapped in shell
scripts that log start and end times, to show where the time goes. The wrappers cost
a few milliseconds per command, so the traced round is not part of the ratios.

Fan-out: a repository of 16 small independent projects, all in the policy; one
pull request per size N touching N of them, against the single-project time times
ceil(N / parallelism).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import JobRecord, World, median
from bot.jobs.git import git_subcommand
from bot.jobs.terraform import find_terraform
from bot.sandbox.forges import REPO
from bot.sandbox.trial import POLICY, project_files

# --------------------------------------------------------------------------- samples


@dataclass
class PlanSample:
    """One webhook -> plan comment, with what the store and the fake saw on the way."""

    label: str
    number: int
    sha: str
    sent: float  # the fake starts sending the webhook
    answered: float  # the bot's answer reached the fake
    received_at: float  # the bot stored the delivery
    comment_at: float  # the plan comment reached the fake
    jobs: list[JobRecord]
    requests: list[tuple[float, str, str, int]] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.comment_at - self.sent

    @property
    def terraform_s(self) -> float:
        """Terraform's own seconds (init when run + plan) of the longest job."""
        return max((j.result.get("terraform_seconds", 0.0) for j in self.jobs), default=0.0)

    @property
    def overhead(self) -> float:
        return self.total - self.terraform_s

    def phases(self) -> dict[str, float]:
        """Seconds per phase for a one-job run; they add up to `total`."""
        job = self.jobs[0]
        return {
            "intake (webhook -> stored)": self.received_at - self.sent,
            "dispatch (stored -> job queued)": job.created_at - self.received_at,
            "queue (queued -> job started)": job.started_at - job.created_at,
            "job minus terraform (status, git)": (job.finished_at - job.started_at) - self.terraform_s,
            "terraform (init when run + plan)": self.terraform_s,
            "report (job done -> comment)": self.comment_at - job.finished_at,
        }


def _sample(world: World, label: str, number: int, sha: str, sent, timeout: float) -> PlanSample:
    comment = world.wait_plan(number, sha, timeout)
    world.wait_idle()
    received = world.delivery_received_at(sent.delivery_id) or sent.started
    # The fake logs a request when it answers, just after it stored the comment: allow for that.
    return PlanSample(label, number, sha, sent.started, sent.answered, received, comment.at,
                      world.plan_jobs(number, sha), world.recorder.requests_between(sent.started, comment.at + 0.05))


# --------------------------------------------------------------------------- bare terraform


def bare_cold(source: Path, project: str, cli_config: Path, scratch: Path) -> dict[str, float]:
    """`terraform init && terraform plan` in a fresh copy of the tree: no .terraform, no plugin cache."""
    if scratch.exists():
        shutil.rmtree(scratch)
    shutil.copytree(source, scratch, ignore=shutil.ignore_patterns(".git", ".terraform*"))
    home = scratch / ".home"
    home.mkdir()
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "TF_CLI_CONFIG_FILE": str(cli_config),
           "TF_IN_AUTOMATION": "1", "TF_INPUT": "0", "CHECKPOINT_DISABLE": "1"}
    terraform = find_terraform()
    times = {}
    started = time.time()
    for phase, args in (("init", ["init", "-input=false", "-no-color"]),
                        ("plan", ["plan", "-input=false", "-no-color"])):
        t = time.time()
        done = subprocess.run([terraform, *args], cwd=scratch / project, env=env, capture_output=True)
        if done.returncode != 0:
            raise RuntimeError(f"bare terraform {phase} failed: {done.stdout.decode()[-2000:]}")
        times[phase] = time.time() - t
    times["total"] = time.time() - started
    shutil.rmtree(scratch, ignore_errors=True)
    return times


# --------------------------------------------------------------------------- tracing


TF_WRAPPER = """#!/bin/sh
echo "$(date +%s.%N) $$ start terraform $1" >> '{trace}'
'{real}' "$@"
rc=$?
echo "$(date +%s.%N) $$ end terraform $1" >> '{trace}'
exit $rc
"""

GIT_WRAPPER = """#!/bin/sh
echo "$(date +%s.%N) $$ start git $*" >> '{trace}'
'{real}' "$@"
rc=$?
echo "$(date +%s.%N) $$ end git" >> '{trace}'
exit $rc
"""


def make_wrappers(directory: Path) -> tuple[dict[str, str], Path]:
    """Shell wrappers that log each git and terraform command's start and end; env for the bot, trace file."""
    directory.mkdir(parents=True, exist_ok=True)
    trace = directory / "trace.log"
    real_git = shutil.which("git")
    assert real_git, "git is not on PATH"
    for name, text, real in (("terraform", TF_WRAPPER, find_terraform()), ("git", GIT_WRAPPER, real_git)):
        path = directory / name
        path.write_text(text.format(trace=trace, real=real))
        path.chmod(0o755)
    env = {"DEPLOYBOT_TERRAFORM__BINARY": str(directory / "terraform"),
           "PATH": f"{directory}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    return env, trace


def read_trace(trace: Path) -> list[tuple[float, float, str]]:
    """(start, end, what) of every wrapped command."""
    starts: dict[str, tuple[float, str]] = {}
    spans = []
    for line in trace.read_text().splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        at, pid, kind, tool = float(parts[0]), parts[1], parts[2], parts[3]
        if kind == "start":
            what = f"terraform {parts[4]}" if tool == "terraform" else f"git {git_subcommand(parts[4:])}"
            starts[pid] = (at, what)
        elif pid in starts:
            begun, what = starts.pop(pid)
            spans.append((begun, at, what))
    return sorted(spans)


def _api_label(method: str, path: str) -> str:
    parts = path.strip("/").split("/")
    if parts[0] == "app":
        return "POST access_tokens (installation token)"
    if len(parts) >= 4 and parts[0] == "repos":
        rest = parts[3:]
        if rest[0] == "pulls":
            return f"{method} pulls/N" + ("/" + rest[2] if len(rest) > 2 else "")
        if rest[0] == "issues":
            return f"{method} issues/N/comments"
        if rest[0] == "statuses":
            return f"{method} statuses/SHA"
        if rest[0] == "collaborators":
            return f"{method} collaborators/U/permission"
        return f"{method} {rest[0]}"
    return f"{method} {path}"


@dataclass
class TraceEvent:
    start: float  # seconds after the webhook was sent
    end: float
    what: str


def timeline(sample: PlanSample, spans: list[tuple[float, float, str]]) -> list[TraceEvent]:
    """Everything between webhook and comment: store marks, wrapped commands, API answers."""
    t0 = sample.sent
    job = sample.jobs[0]
    events = [
        TraceEvent(0, sample.received_at - t0, "webhook sent -> delivery stored"),
        TraceEvent(sample.received_at - t0, sample.answered - t0, "stored -> 202 back at the fake"),
        TraceEvent(job.created_at - t0, job.created_at - t0, "job queued (store)"),
        TraceEvent(job.started_at - t0, job.started_at - t0, "job started (store)"),
        TraceEvent(job.finished_at - t0, job.finished_at - t0, "job finished (store)"),
        TraceEvent(sample.comment_at - t0, sample.comment_at - t0, "plan comment stored by the fake"),
    ]
    for start, end, what in spans:
        if sample.sent <= start <= sample.comment_at:
            events.append(TraceEvent(start - t0, end - t0, what))
    for at, method, path, status in sample.requests:
        events.append(TraceEvent(at - t0, at - t0, f"API answered: {_api_label(method, path)} ({status})"))
    return sorted(events, key=lambda e: (e.start, e.end))


def summarize_trace(sample: PlanSample, spans: list[tuple[float, float, str]]) -> dict[str, float]:
    """Seconds by kind of work between webhook and comment (wrapped commands, summed)."""
    out: dict[str, float] = {}
    job = sample.jobs[0]
    for start, end, what in spans:
        if not sample.sent <= start <= sample.comment_at:
            continue
        where = "dispatch" if start < job.created_at else ("job" if start < job.finished_at else "report")
        key = f"{what} ({where})" if what.startswith("git") else what
        out[key] = out.get(key, 0.0) + (end - start)
    return out


# --------------------------------------------------------------------------- plan overhead


@dataclass
class PlanReport:
    cold: list[PlanSample]
    warm: list[PlanSample]
    bare: list[dict[str, float]]
    pairs: list[tuple[float, float]]  # (bot cold, bare cold) per round, for paired ratios
    traced: list[PlanSample]
    trace_spans: list[tuple[float, float, str]]
    bot_rss_mb: float


def _staging(world: World, size: str) -> dict[str, str]:
    return {"staging/main.tf": project_files(world.root / "state", {"staging": size})["staging/main.tf"]}


def run_plan(root: Path, rounds: int, plugin_cache: Path, trace: bool = True, log_level: str = "info",
             say=print) -> PlanReport:
    state = root / "world" / "state"
    state.mkdir(parents=True)
    world = World(root / "world", project_files(state, {"staging": "small", "production": "small"}), POLICY,
                  log_level=log_level, plugin_cache_dir=str(plugin_cache))
    cli_config = root / "world" / "terraform-mirror" / "terraformrc"
    report = PlanReport([], [], [], [], [], [], 0.0)
    try:
        world.start_bot()
        # Unmeasured warm-up: fills the bot's plugin cache and git mirror, pages terraform in.
        number, sha, sent = world.open_pr("warmup", _staging(world, "warmup"))
        world.wait_plan(number, sha)
        world.close_pr(number)
        source = root / "bare-source"
        shutil.copytree(world.repo.work, source, ignore=shutil.ignore_patterns(".git", ".terraform*"))
        for i in range(rounds):
            bot_first = i % 2 == 0
            for turn in ("bot", "bare") if bot_first else ("bare", "bot"):
                if turn == "bare":
                    bare = bare_cold(source, "staging", cli_config, root / "bare-run")
                    report.bare.append(bare)
                    continue
                branch = f"round-{i}"
                number, sha, sent = world.open_pr(branch, _staging(world, f"r{i}"))
                cold = _sample(world, "cold", number, sha, sent, 300)
                sha, sent = world.push(number, branch, _staging(world, f"r{i}-push"))
                warm = _sample(world, "warm", number, sha, sent, 300)
                world.close_pr(number)
                report.cold.append(cold)
                report.warm.append(warm)
            report.pairs.append((report.cold[-1].total, report.bare[-1]["total"]))
            say(f"  plan round {i + 1}/{rounds}: bot cold {report.cold[-1].total:.2f}s "
                f"(terraform {report.cold[-1].terraform_s:.2f}s), warm {report.warm[-1].total:.2f}s, "
                f"bare cold {report.bare[-1]['total']:.2f}s")
        report.bot_rss_mb = world.bot.memory_mb()["VmRSS"] if world.bot else 0.0
        world.stop_bot()
        if trace:
            env, trace_file = make_wrappers(root / "trace")
            world.start_bot(env=env, log_name="bot-traced.log")
            number, sha, sent = world.open_pr("traced", _staging(world, "traced"))
            report.traced.append(_sample(world, "traced cold", number, sha, sent, 300))
            sha, sent = world.push(number, "traced", _staging(world, "traced-push"))
            report.traced.append(_sample(world, "traced warm", number, sha, sent, 300))
            world.close_pr(number)
            report.trace_spans = read_trace(trace_file)
            say(f"  traced round: cold {report.traced[0].total:.2f}s, warm {report.traced[1].total:.2f}s")
    finally:
        world.close()
    return report


# --------------------------------------------------------------------------- fan-out

FANOUT_TF = """\
terraform {{
  required_providers {{
    null = {{ source = "hashicorp/null", version = "2.1.2" }}
  }}
  backend "local" {{ path = "{state}" }}
}}

resource "null_resource" "app" {{
  triggers = {{ size = "{size}" }}
}}

resource "null_resource" "db" {{
  triggers = {{ name = "{name}" }}
}}
"""


def fanout_files(state_dir: Path, names: list[str], size: str) -> dict[str, str]:
    return {f"{name}/main.tf": FANOUT_TF.format(state=(state_dir / f"{name}.tfstate").as_posix(), size=size,
                                                name=name) for name in names}


@dataclass
class FanoutSample:
    n: int
    sample: PlanSample

    @property
    def dispatch(self) -> float:
        return min(j.created_at for j in self.sample.jobs) - self.sample.received_at

    @property
    def max_concurrent(self) -> int:
        edges = sorted([(j.started_at, 1) for j in self.sample.jobs] + [(j.finished_at, -1) for j in self.sample.jobs],
                       key=lambda e: (e[0], e[1]))
        now = peak = 0
        for _, step in edges:
            now += step
            peak = max(peak, now)
        return peak

    @property
    def terraform_sum(self) -> float:
        return sum(j.result.get("terraform_seconds", 0.0) for j in self.sample.jobs)

    @property
    def mean_job_minus_terraform(self) -> float:
        """Mean job time outside terraform: git, status calls, and waiting for the init lock."""
        return sum(j.finished_at - j.started_at - j.result.get("terraform_seconds", 0.0)
                   for j in self.sample.jobs) / len(self.sample.jobs)

    @property
    def mean_job(self) -> float:
        return sum(j.finished_at - j.started_at for j in self.sample.jobs) / len(self.sample.jobs)


@dataclass
class FanoutReport:
    parallelism: int
    samples: list[FanoutSample]
    sizes: list[int]

    def times(self, n: int) -> list[float]:
        return [s.sample.total for s in self.samples if s.n == n]

    def of(self, n: int) -> list[FanoutSample]:
        return [s for s in self.samples if s.n == n]

    def expected(self, n: int) -> float:
        return median(self.times(1)) * math.ceil(n / self.parallelism)


def run_fanout(root: Path, sizes: list[int], rounds: int, parallelism: int, plugin_cache: Path,
               log_level: str = "info", say=print) -> FanoutReport:
    total = max(sizes)
    names = [f"p{i:02d}" for i in range(1, total + 1)]
    state = root / "world" / "state"
    state.mkdir(parents=True)
    policy = {"repos": {REPO: {"plan": {"permission": "write"},
                               "projects": [{"name": name, "dir": name} for name in names]}}}
    world = World(root / "world", fanout_files(state, names, "small"), policy, log_level=log_level,
                  plugin_cache_dir=str(plugin_cache), parallelism=parallelism)
    report = FanoutReport(parallelism, [], sizes)
    try:
        world.start_bot()
        number, sha, _ = world.open_pr("warmup", fanout_files(state, names[:1], "warmup"))
        world.wait_plan(number, sha)
        world.close_pr(number)
        for r in range(rounds):
            for n in sizes:
                branch = f"fan-{n}-r{r}"
                number, sha, sent = world.open_pr(branch, fanout_files(state, names[:n], f"r{r}n{n}"))
                sample = FanoutSample(n, _sample(world, f"fan-out {n}", number, sha, sent, 600))
                world.close_pr(number)
                failed = [j.project for j in sample.sample.jobs if j.status != "succeeded"]
                if len(sample.sample.jobs) != n or failed:
                    raise RuntimeError(f"fan-out {n}: {len(sample.sample.jobs)} jobs, failed: {failed}")
                report.samples.append(sample)
                say(f"  fan-out round {r + 1}/{rounds} N={n:>2}: {sample.sample.total:.2f}s "
                    f"(dispatch {sample.dispatch:.2f}s, at most {sample.max_concurrent} jobs at once)")
    finally:
        world.close()
    return report
