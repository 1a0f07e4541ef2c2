"""Section 5: what walls cost — a job in its bubblewrap sandbox, and a job through a runner.

- Sandbox: one job's terraform (`init` then `plan`, in a fresh copy of a project, with the
  job's files handed over as the bot does) with `terraform.sandbox: bubblewrap` and with
  `none`, alternating, through `bot.jobs.executor.run_phase` — the code path of every job.
- Runner: webhook → plan comment on a bot that runs the job itself and on a bot whose
  plan pool has one `deploybot runner` process, alternating PRs.
- Runner fan-out: one PR touching 16 projects with 1, 2 and 4 runner processes, against
  the bot running them itself at `terraform.parallelism` 2.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.common import World, median
from bench.plans import FANOUT_TF, _sample, fanout_files
from bot.jobs.executor import JobSpec, run_phase
from bot.jobs.sandbox import JobFiles, Sandbox
from bot.jobs.terraform import Terraform, TerraformSettings, find_terraform, make_null_provider_mirror
from bot.sandbox.trial import REPO

ADMIN_TOKEN = "bench-admin-token"


@dataclass
class IsolationReport:
    sandboxed: list[float] = field(default_factory=list)  # seconds per job
    unconfined: list[float] = field(default_factory=list)
    in_bot: list[float] = field(default_factory=list)  # webhook -> plan comment
    via_runner: list[float] = field(default_factory=list)
    fanout: dict[str, list[float]] = field(default_factory=dict)  # "bot, parallelism 2" / "1 runner" -> seconds


class _NoLog:
    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        pass


def run_sandbox(root: Path, rounds: int, say=print) -> tuple[list[float], list[float]]:
    """Seconds per job (init + plan) with and without the sandbox, alternating."""
    state = root / "state"
    cli_config = make_null_provider_mirror(root / "mirror")
    source = root / "source"
    source.mkdir(parents=True)
    (source / "main.tf").write_text(FANOUT_TF.format(state=(state / "p.tfstate").as_posix(), size="s", name="p"))
    times: dict[str, list[float]] = {"bubblewrap": [], "none": []}
    runners = {}
    for kind in times:
        sandbox = Sandbox(kind, read_only=(cli_config.parent,), read_write=(state,))
        sandbox.share()
        runners[kind] = Terraform(TerraformSettings(binary=find_terraform(), plugin_cache_dir=root / "cache",
                                                    home_dir=root / "home", cli_config_file=cli_config,
                                                    sandbox=sandbox))

    async def job(kind: str, n: int) -> float:
        files = JobFiles(checkout=root / f"job-{kind}-{n}" / "checkout", scratch=root / f"job-{kind}-{n}" / "scratch")
        shutil.copytree(source, files.checkout)
        files.scratch.mkdir()
        started = time.monotonic()
        await asyncio.to_thread(runners[kind].settings.sandbox.hand_over, files)
        done = await run_phase(runners[kind], JobSpec(n, "plan", ".", "default", {}), files, _NoLog())
        if not done.ok:
            raise RuntimeError(f"sandbox bench job failed ({kind}): {done.failure}\n{done.output[-2000:]}")
        return time.monotonic() - started

    for n in range(rounds + 1):  # the first round warms the page cache, and is not counted
        order = ("bubblewrap", "none") if n % 2 == 0 else ("none", "bubblewrap")
        for kind in order:
            seconds = asyncio.run(job(kind, n))
            if n:
                times[kind].append(seconds)
        if n:
            say(f"  sandbox round {n}/{rounds}: bubblewrap {times['bubblewrap'][-1]:.3f}s, "
                f"none {times['none'][-1]:.3f}s")
    return times["bubblewrap"], times["none"]


class _Runner:
    def __init__(self, world: World, pool: str, name: str) -> None:
        made = httpx.post(f"{world.bot.url}/api/v1/runner-tokens", json={"pool": pool},
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
        made.raise_for_status()
        token_file = world.root / f"token-{name}"
        token_file.write_text(made.json()["token"])
        mirror = world.root / "terraform-mirror"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bot.cli", "runner", "--server", world.bot.url, "--token-file", str(token_file),
             "--pool", pool, "--name", name, "--terraform", find_terraform(),
             "--cli-config-file", str(mirror / "terraformrc"), "--sandbox-read-only", str(mirror),
             "--sandbox-read-write", str(world.root / "state"), "--work-dir", str(world.root),
             "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=open(world.root / f"runner-{name}.log", "ab"))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def _pooled_world(root: Path, names: list[str], pooled: bool, log_level: str, parallelism: int) -> World:
    state = root / "state"
    state.mkdir(parents=True)
    pools = {"pools": {"plan": "plans", "apply": "applies"}} if pooled else {}
    policy = {"repos": {REPO: {"plan": {"permission": "write"}, **pools,
                               "projects": [{"name": name, "dir": name} for name in names]}}}
    extra = {"server": {"admin_token": ADMIN_TOKEN},
             "runners": {"pools": {"plans": "plan", "applies": "apply"}, "claim_wait_seconds": 20}}
    return World(root, fanout_files(state, names, "small"), policy, log_level=log_level, extra=extra,
                 parallelism=parallelism)


def run_runner(root: Path, rounds: int, log_level: str, say=print) -> tuple[list[float], list[float]]:
    """Webhook → plan comment, the bot running the job vs one runner running it, alternating."""
    names = ["p01"]
    worlds = {"bot": _pooled_world(root / "bot", names, False, log_level, 2),
              "runner": _pooled_world(root / "runner", names, True, log_level, 2)}
    runner = None
    times: dict[str, list[float]] = {"bot": [], "runner": []}
    try:
        for world in worlds.values():
            world.start_bot()
        runner = _Runner(worlds["runner"], "plans", "bench-runner")
        for n in range(rounds + 1):  # round 0 warms both up
            order = ("bot", "runner") if n % 2 == 0 else ("runner", "bot")
            for kind in order:
                world = worlds[kind]
                number, sha, sent = world.open_pr(f"r{n}", fanout_files(world.root / "state", names, f"r{n}"))
                sample = _sample(world, kind, number, sha, sent, 300)
                world.close_pr(number)
                if n:
                    times[kind].append(sample.total)
            if n:
                say(f"  runner round {n}/{rounds}: in the bot {times['bot'][-1]:.2f}s, "
                    f"through a runner {times['runner'][-1]:.2f}s")
    finally:
        if runner is not None:
            runner.stop()
        for world in worlds.values():
            world.close()
    return times["bot"], times["runner"]


def run_runner_fanout(root: Path, n: int, runner_counts: list[int], rounds: int, log_level: str,
                      say=print) -> dict[str, list[float]]:
    """One PR touching `n` projects: the bot itself at parallelism 2, then 1, 2, 4 runners."""
    names = [f"p{i:02d}" for i in range(1, n + 1)]
    results: dict[str, list[float]] = {}
    for label, count in [("the bot, parallelism 2", 0)] + [(f"{k} runner{'s' * (k > 1)}", k) for k in runner_counts]:
        world = _pooled_world(root / label.replace(" ", "-").replace(",", ""), names, bool(count), log_level, 2)
        runners: list[_Runner] = []
        try:
            world.start_bot()
            runners = [_Runner(world, "plans", f"r{i}") for i in range(count)]
            number, sha, sent = world.open_pr("warmup", fanout_files(world.root / "state", names[:1], "warm"))
            _sample(world, "warmup", number, sha, sent, 300)
            world.close_pr(number)
            results[label] = []
            for r in range(rounds):
                number, sha, sent = world.open_pr(f"fan-{r}", fanout_files(world.root / "state", names, f"r{r}"))
                results[label].append(_sample(world, label, number, sha, sent, 600).total)
                world.close_pr(number)
            say(f"  runner fan-out, {n} projects, {label}: {median(results[label]):.2f}s")
        finally:
            for runner in runners:
                runner.stop()
            world.close()
    return results


def run(root: Path, rounds: int, fanout_rounds: int, log_level: str, say=print) -> IsolationReport:
    report = IsolationReport()
    report.sandboxed, report.unconfined = run_sandbox(root / "sandbox", rounds * 2, say)
    report.in_bot, report.via_runner = run_runner(root / "runner", rounds, log_level, say)
    report.fanout = run_runner_fanout(root / "runner-fanout", 16, [1, 2, 4], fanout_rounds, log_level, say)
    return report

