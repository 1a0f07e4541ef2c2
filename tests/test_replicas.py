"""Two replicas of the bot on one PostgreSQL store, behind one address (issue 14).

Real `deploybot serve` processes, each with its own data dir (git mirrors and working dirs
are per-replica caches), the local GitHub sending its webhooks to a round-robin balancer in
front of them, real terraform. One replica is SIGKILLed while it runs a pull request's plan:
the other takes the plan over after the lease, and the story completes with every comment
posted once and the apply run once.
"""

from __future__ import annotations

import http.server
import itertools
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from bot.models import Project
from bot.sandbox.trial import free_port, wait_for
from bot.store import Store
from tests.world import World, staging_change, visible

LEASE_SECONDS = 2


class RoundRobin:
    """A load balancer: each request to the next replica in turn; one that is down is skipped."""

    def __init__(self, backends: list[str]) -> None:
        self.backends = backends
        self.forwarded: dict[str, int] = {backend: 0 for backend in backends}
        turn = itertools.cycle(range(len(backends)))
        balancer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                first = next(turn)
                for i in range(len(balancer.backends)):
                    backend = balancer.backends[(first + i) % len(balancer.backends)]
                    try:
                        answer = httpx.request(self.command, backend + self.path, headers=headers, content=body,
                                               timeout=60)
                    except httpx.TransportError:
                        continue  # that replica is down: the next one
                    balancer.forwarded[backend] += 1
                    self.send_response(answer.status_code)
                    for key, value in answer.headers.items():
                        if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                            self.send_header(key, value)
                    self.send_header("content-length", str(len(answer.content)))
                    self.end_headers()
                    self.wfile.write(answer.content)
                    return
                self.send_error(502)

            do_GET = do_POST = do_PUT = do_DELETE = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()


class Replica:
    """One `deploybot serve` process with its own port and data dir."""

    def __init__(self, config_path: Path, log: Path) -> None:
        self.config_path, self.log = config_path, log
        config = yaml.safe_load(config_path.read_text())
        self.url = f"http://127.0.0.1:{config['server']['port']}"
        self.process: subprocess.Popen | None = None

    def start(self) -> "Replica":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bot.cli", "serve", "--config", str(self.config_path), "--log-level", "info"],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))
        wait_for(self._healthy, 30, f"the replica at {self.url}")
        return self

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)


def second_replica_config(world: World) -> Path:
    """The world's config with a port and data dir of its own."""
    config = yaml.safe_load(world.config_path.read_text())
    port = free_port()
    config["server"].update(port=port, public_url=f"http://127.0.0.1:{port}", data_dir=str(world.root / "data-2"))
    path = world.root / "config-2.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _running_plan(store: Store) -> tuple[int, str] | None:
    jobs = [job for job in store.jobs_with_status("running") if job.run.command == "plan"]
    if not jobs:
        return None
    with store._db() as db:
        owner = db.execute("SELECT owner FROM jobs WHERE id = ?", (jobs[0].id,)).fetchone()["owner"]
    return jobs[0].id, owner


def _owners(store: Store, job_ids: list[int]) -> dict[int, tuple[str, int]]:
    with store._db() as db:
        rows = [db.execute("SELECT owner, attempt FROM jobs WHERE id = ?", (job_id,)).fetchone() for job_id in job_ids]
    return {job_id: (row["owner"], row["attempt"]) for job_id, row in zip(job_ids, rows)}


@pytest.mark.parametrize("store_location", ["postgresql"], indirect=True)
def test_two_replicas_carry_a_story_through_a_sigkill_and_share_fifty_jobs(tmp_path: Path, store_location) -> None:
    if not isinstance(store_location, str):
        pytest.skip("PostgreSQL only")
    world = World(tmp_path, in_process=False, extra_config={"server": {
        "database_url": store_location, "replica_lease_seconds": LEASE_SECONDS}})
    replicas = [Replica(world.config_path, tmp_path / "bot.log"),
                Replica(second_replica_config(world), tmp_path / "bot-2.log").start()]
    replicas[0].process = world.process
    balancer = RoundRobin([replica.url for replica in replicas])
    world.forge.set_webhook(balancer.url)
    store = Store(store_location)
    try:
        number = world.open_pr("resize", staging_change(world))
        # The plan runs on one of the two: kill that one in the middle of it.
        job_id, owner = wait_for(lambda: _running_plan(store), 60, "a replica to run the plan")
        victim = next(r for r in replicas if f":{r.process.pid}:" in owner)
        victim.kill()
        started = time.monotonic()
        plan = visible(world.wait_comment(number, "**deploybot plan**"))
        taken_over_after = time.monotonic() - started
        assert "✅ `staging`: +" in plan
        assert taken_over_after >= LEASE_SECONDS * 0.8  # not before the lease ran out
        assert _owners(store, [job_id])[job_id][1] == 2  # claimed twice: killed, then taken over
        victim.start()  # a new replica takes its place

        world.forge.approve(number, "dave")
        world.comment(number, "bob", "deploybot apply")
        applied = visible(world.wait_comment(number, "**deploybot apply**"))
        assert "✅ `staging`: applied plan" in applied
        world.comment(number, "alice", "deploybot plan")  # more webhooks over both replicas
        world.wait_comment(number, "**deploybot plan**", after=2)
        world.wait_idle()

        # Every comment once, the apply once.
        comments = world.bot_comments(number)
        assert len([c for c in comments if "**deploybot plan**" in c]) == 2
        assert len([c for c in comments if "**deploybot apply**" in c]) == 1
        applies = [job for job in store.jobs_with_status("succeeded") if job.run.command == "apply"]
        assert len(applies) == 1 and world.state_resources("staging") == 2
        assert len([e for e in store.audit_entries(500) if e["action"] == "apply" and e["outcome"] == "succeeded"]) == 1
        ready = [httpx.get(f"{replica.url}/readyz", timeout=10).json() for replica in replicas]
        assert sorted(r["replica"] for r in ready) == sorted(ready[0]["replicas"])  # each sees both alive
        webhooks_to = balancer.forwarded
        assert all(count > 0 for count in webhooks_to.values()), webhooks_to  # both took webhooks

        # Closed: every replica drops its working dirs of the pull request (caches of its own).
        def working_dirs() -> list[list[Path]]:
            return [list((world.root / data).glob(f"work/*/pr-{number}")) for data in ("data", "data-2")]
        [planned, *_] = [path for paths in working_dirs() for path in paths]
        for data in ("data", "data-2"):  # whichever replicas ran its jobs: each holds a cache of it now
            (world.root / data / planned.relative_to(planned.parents[2])).mkdir(parents=True, exist_ok=True)
        assert all(working_dirs())
        world.forge.merge(number)
        wait_for(lambda: not any(working_dirs()), 60, "every replica to drop the pull request's working dirs")
        world.wait_idle()

        # Fifty jobs at once: both replicas claim them, each runs exactly once.
        repo = applies[0].run.repo
        sha = world.repo.sha("main")
        runs = [store.add_run(f"bulk-{i}", repo, 0, sha, "plan", "api", "ci", [Project(f"absent-{i % 10}")])
                for i in range(50)]
        job_ids = [store.run_jobs(run.id)[0].id for run in runs]
        wait_for(lambda: all(store.run_jobs(run.id)[0].status == "failed" for run in runs), 120, "the fifty jobs")
        owners = _owners(store, job_ids)
        assert all(attempt == 1 for _, attempt in owners.values())  # each claimed once
        assert len({owner for owner, _ in owners.values()}) == 2  # by both replicas
        assert all("does not exist" in store.run_jobs(run.id)[0].result["summary"] for run in runs)
        finished = [e for e in store.audit_entries(1000) if e["detail"].startswith("api run ")
                    and int(e["detail"].split()[2].rstrip(":")) in {run.id for run in runs}]
        assert len(finished) == 50
    finally:
        store.close()
        balancer.stop()
        for replica in replicas:
            replica.stop()
        world.process = None
        world.stop()
