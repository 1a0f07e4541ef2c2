"""Benchmark 1 (webhook intake) and 4 (memory).

Signed ~25 KB `pull_request` `opened` deliveries, each with its own
`X-GitHub-Delivery`, for a repository the policy does not list: the bot verifies,
parses, persists and acknowledges each one (202), then its dispatcher hands it to the
autoplan handler, which looks the repository up in the policy and stops. The same
requests go to a bare Starlette app that only checks the HMAC (bench/baseline_app.py).

Load: an async httpx client on loopback, open loop on a fixed schedule (request i is
due at t0 + i/rate, whatever happened to the earlier ones) with at most `concurrency`
requests in flight; latency is counted from the due time, so a server that falls
behind pays for the queue it causes. A last closed-loop step (`concurrency` clients
sending back to back) finds each server's saturation throughput.

Each step runs against the baseline, then against the bot; after a bot step the
bench waits until the dispatcher has handled everything (so the next step starts
quiet) and counts that drain time and CPU towards the bot. The bot's store keeps
every delivery, so the judged rate is repeated at the end against a fuller store.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from bench.common import REPO_ROOT, Server, World, bot_server, percentile, proc_memory_mb
from bot.sandbox.forges import INSTALLATION_ID, WEBHOOK_SECRET
from bot.sandbox.trial import POLICY
from bot.store import Store

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "github" / "pull_request.opened.1.json"
UNLISTED_REPO = "bench-org/not-allow-listed"
NUMBER_PLACEHOLDER = b"987654321"  # 9 digits, replaced per delivery by the PR number


def _pr_body(size: int) -> str:
    """A pull request description of about `size` characters, as people paste them."""
    head = (
        "## What\n\nResize the web tier and move the worker pool to the new subnets.\n\n"
        "## Why\n\nThe p95 latency alarm fired three times last week (see INC-2291).\n\n"
        "## Checklist\n\n- [x] `terraform fmt`\n- [x] plan reviewed\n- [ ] apply scheduled\n\n"
        "## Plan excerpt\n\n```\n"
    )
    lines = []
    i = 0
    while len(head) + sum(map(len, lines)) < size - 8:
        lines.append(
            f"  # aws_instance.web[{i}] will be updated in-place\n"
            f"  ~ resource \"aws_instance\" \"web\" {{\n"
            f"        id            = \"i-0{i:015x}\"\n"
            f"      ~ instance_type = \"t3.small\" -> \"t3.large\"\n"
            f"        tags          = {{ \"Name\" = \"web-{i}\", \"team\" = \"platform\" }}\n"
            f"    }}\n"
        )
        i += 1
    return (head + "".join(lines))[: size - 4] + "\n```"


def delivery_template(target_bytes: int = 25_600) -> bytes:
    """A compact JSON body of about `target_bytes`, from GitHub's own example, for an unlisted repo."""
    payload = json.loads(FIXTURE.read_text())
    owner, name = UNLISTED_REPO.split("/")
    repo = payload["repository"]
    repo.update(full_name=UNLISTED_REPO, name=name, clone_url=f"https://github.com/{UNLISTED_REPO}.git")
    repo["owner"]["login"] = owner
    payload["installation"] = {"id": INSTALLATION_ID, "node_id": "MDIzOkludGVncmF0aW9uSW5zdGFsbGF0aW9uNDI0Mg=="}
    payload["number"] = payload["pull_request"]["number"] = int(NUMBER_PLACEHOLDER)
    payload["pull_request"]["body"] = ""
    bare = len(json.dumps(payload).encode())
    payload["pull_request"]["body"] = _pr_body(max(0, target_bytes - bare))
    body = json.dumps(payload).encode()
    assert body.count(NUMBER_PLACEHOLDER) == 2, "the placeholder must name only the PR number"
    return body


class Deliveries:
    """Builds signed deliveries with unique ids and remembers which were answered 2xx."""

    def __init__(self, template: bytes, secret: bytes) -> None:
        self.template = template
        self.secret = secret
        self.counter = 0

    def next(self) -> tuple[bytes, dict[str, str], str]:
        self.counter += 1
        body = self.template.replace(NUMBER_PLACEHOLDER, str(100_000_000 + self.counter).encode())
        delivery_id = str(uuid.uuid4())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "GitHub-Hookshot/bench",
            "X-GitHub-Event": "pull_request",
            "X-GitHub-Delivery": delivery_id,
            "X-GitHub-Hook-ID": "1",
            "X-Hub-Signature-256": "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest(),
        }
        return body, headers, delivery_id


@dataclass
class StepResult:
    server: str
    step: str  # "100/s" or "max"
    target_rate: float | None
    sent: int = 0
    ok: int = 0
    errors: int = 0
    elapsed: float = 0.0  # first due time -> last answer
    latencies_ms: list[float] = field(default_factory=list)  # due time -> answer (2xx and errors)
    lag_ms: list[float] = field(default_factory=list)  # due time -> sent (queued behind the bound)
    server_cpu_s: float = 0.0  # the server's CPU during the step (and, for the bot, its drain)
    client_cpu_s: float = 0.0  # this process's CPU during the step
    drain_s: float = 0.0  # bot only: last answer -> every delivery dispatched
    stored_before: int = 0  # bot only: deliveries in its store when the step began
    peak_rss_mb: float = 0.0  # bot only: highest VmRSS sampled during the step and its drain
    ok_ids: list[str] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0

    def p(self, q: float) -> float:
        return percentile(self.latencies_ms, q)

    @property
    def cpu_ms_per_delivery(self) -> float:
        return 1000 * self.server_cpu_s / self.ok if self.ok else float("nan")

    @property
    def client_cpu_share(self) -> float:
        """How busy the load generator was (1.0 = one core flat out)."""
        return self.client_cpu_s / self.elapsed if self.elapsed else 0.0


class RawHTTP:
    """A minimal HTTP/1.1 keep-alive client on asyncio: `size` connections, one request each at a time.

    It only writes a prepared request and reads the status line, Content-Length and body
    of the answer, so it spends a few tens of microseconds per request where httpx spends
    milliseconds: on a two-core machine the load generator must not eat the server's core.
    """

    def __init__(self, url: str, size: int) -> None:
        parsed = httpx.URL(url)
        self.host, self.port, self.path = parsed.host, parsed.port or 80, parsed.raw_path.decode()
        self.size = size
        self._idle: asyncio.Queue[_RawConnection] = asyncio.Queue()

    async def __aenter__(self) -> "RawHTTP":
        for _ in range(self.size):
            self._idle.put_nowait(await self._connect())
        return self

    async def __aexit__(self, *exc: object) -> None:
        while not self._idle.empty():
            self._idle.get_nowait().close()

    async def _connect(self) -> "_RawConnection":
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(_RawConnection, self.host, self.port)
        return protocol

    async def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        head = [f"POST {self.path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        connection = await self._idle.get()
        try:
            if connection.closed:
                connection = await self._connect()
            return await connection.exchange(request)
        finally:
            self._idle.put_nowait(connection)


class _RawConnection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buffer = bytearray()
        self._waiter: asyncio.Future | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("connection closed by the server"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)  # type: ignore[union-attr]
        return await self._waiter

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0 or self._waiter is None:
            return
        head = bytes(self._buffer[:end]).decode("latin-1")
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(self._buffer) < end + 4 + length:
            return
        status = int(head.split(" ", 2)[1])
        body = bytes(self._buffer[end + 4 : end + 4 + length])
        del self._buffer[: end + 4 + length]
        if not self._waiter.done():
            self._waiter.set_result((status, body))
        if "connection: close" in head.lower():
            self.closed = True
            self.close()


class HttpxClient:
    """The same interface over httpx.AsyncClient (`--client httpx`)."""

    def __init__(self, url: str, size: int) -> None:
        self.url = url
        self.size = size
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        self._client = httpx.AsyncClient(limits=limits, timeout=30)

    async def __aenter__(self) -> "HttpxClient":
        health = self.url.rsplit("/webhooks/", 1)[0] + "/healthz"
        await asyncio.gather(*(self._client.get(health) for _ in range(self.size)))  # open the connections
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    async def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        response = await self._client.post(self.url, content=body, headers=headers)
        return response.status_code, response.content


CLIENTS = {"raw": RawHTTP, "httpx": HttpxClient}


class Spread:
    """Clients of several servers (replicas), posting to each in turn, as a load balancer would."""

    def __init__(self, kind: str, urls: list[str], size: int) -> None:
        self._clients = [CLIENTS[kind](url, max(1, size // len(urls))) for url in urls]
        self._next = 0

    async def __aenter__(self) -> "Spread":
        for client in self._clients:
            await client.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self._clients:
            await client.__aexit__(*exc)

    async def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        client = self._clients[self._next]
        self._next = (self._next + 1) % len(self._clients)
        return await client.post(body, headers)


class Replicas:
    """Several bot processes seen as one server: their CPU summed, each at its own address."""

    def __init__(self, servers: list[Server]) -> None:
        self.servers = servers

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    def cpu_seconds(self) -> float:
        return sum(server.cpu_seconds() for server in self.servers)


async def _post(client, deliveries: Deliveries, result: StepResult, due: float,
                loop: asyncio.AbstractEventLoop) -> None:
    body, headers, delivery_id = deliveries.next()
    sent = loop.time()
    try:
        status, answer = await client.post(body, headers)
        detail = "" if 200 <= status < 300 else f"{status} {answer[:120]!r}"
    except (httpx.HTTPError, OSError) as exc:
        status, detail = 0, f"{type(exc).__name__}: {exc}"
    done = loop.time()
    result.sent += 1
    result.latencies_ms.append(1000 * (done - due))
    result.lag_ms.append(1000 * (sent - due))
    if 200 <= status < 300:
        result.ok += 1
        result.ok_ids.append(delivery_id)
    else:
        result.errors += 1
        if len(result.error_samples) < 3:
            result.error_samples.append(detail)


async def open_loop(client_kind: str, urls: list[str], deliveries: Deliveries, result: StepResult, rate: float,
                    duration: float, concurrency: int) -> None:
    """`rate` requests a second for `duration` seconds on a fixed schedule, `concurrency` at most in flight."""
    loop = asyncio.get_running_loop()
    async with Spread(client_kind, urls, concurrency) as client:
        bound = asyncio.Semaphore(concurrency)
        count = int(rate * duration)
        start = loop.time() + 0.05
        tasks = []
        last_done = start

        async def one(due: float) -> None:
            nonlocal last_done
            async with bound:
                await _post(client, deliveries, result, due, loop)
                last_done = max(last_done, loop.time())

        for i in range(count):
            due = start + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(due)))
        await asyncio.gather(*tasks)
        result.elapsed = last_done - start


async def closed_loop(client_kind: str, urls: list[str], deliveries: Deliveries, result: StepResult, duration: float,
                      concurrency: int) -> None:
    """`concurrency` clients, each sending its next request as soon as the last is answered."""
    loop = asyncio.get_running_loop()
    async with Spread(client_kind, urls, concurrency) as client:
        start = loop.time()
        stop = start + duration
        last_done = start

        async def worker() -> None:
            nonlocal last_done
            while loop.time() < stop:
                await _post(client, deliveries, result, loop.time(), loop)
                last_done = max(last_done, loop.time())

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.elapsed = last_done - start


class RssSampler:
    """Reads a process's VmRSS every 50 ms in a thread; `take()` returns the highest since the last take."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self._peak = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                rss = proc_memory_mb(self.pid)["VmRSS"]
            except (OSError, KeyError):
                continue
            with self._lock:
                self._peak = max(self._peak, rss)

    def take(self) -> float:
        with self._lock:
            peak, self._peak = self._peak, 0.0
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _idle_cpu(server: Server, seconds: float) -> float:
    """The server's CPU use (in cores) over `seconds` of no requests."""
    before = server.cpu_seconds()
    time.sleep(seconds)
    return (server.cpu_seconds() - before) / seconds


def _wait_dispatched(store_path: Path | str, timeout: float) -> float:
    """Seconds until the bot has no delivery left to dispatch."""
    started = time.monotonic()
    store = Store(store_path)
    try:
        while store.pending_deliveries():
            if time.monotonic() - started > timeout:
                raise TimeoutError("the bot did not dispatch its deliveries in time")
            time.sleep(0.05)
    finally:
        store.close()
    return time.monotonic() - started


@dataclass
class IntakeReport:
    steps: list[StepResult]
    bot_memory: dict[str, float]  # idle_rss, load_rss (highest sampled under load), end_rss, hwm (VmHWM)
    persisted: int
    dispatched_ok: int
    accepted: int
    body_bytes: int
    concurrency: int
    log_level: str
    client: str
    stored_deliveries: int  # rows in the bot's deliveries table at the end
    pending_scan_ms: float  # what one Store.claim_delivery() (the dispatcher's poll) took then
    idle_cpu_start: float  # the bot's CPU (cores) while idle, fresh
    idle_cpu_end: float  # the same after the load, with every delivery stored
    backend: str = "SQLite"  # the bot's database
    replicas: int = 1  # bot processes sharing it, the load spread over them


def run(root: Path, rates: list[float], step_seconds: float, max_seconds: float, concurrency: int,
        log_level: str = "info", client: str = "raw", again_rate: float | None = None, say=print,
        database_url: str = "", replicas: int = 1) -> IntakeReport:
    """Every step against both servers; `again_rate` repeats that rate at the end, when the bot's
    store holds every delivery of the earlier steps. `database_url`: the bot on PostgreSQL, in
    `replicas` processes that the load is spread over (each with its own data dir)."""
    root.mkdir(parents=True, exist_ok=True)
    world = World(root / "world", {"README.md": "intake benchmark\n"}, POLICY, log_level=log_level,
                  extra={"server": {"database_url": database_url}} if database_url else None)
    world.forge.stop()  # the bot never calls it for an unlisted repository; keep this process quiet
    bot = world.start_bot()
    bots = Replicas([bot] + [bot_server(replica_config(world.config_path, i), root / "world" / f"bot-{i}.log",
                                        log_level).start() for i in range(2, replicas + 1)])
    baseline_port = _free_port()
    baseline = Server("baseline", [sys.executable, "-m", "bench.baseline_app", "--port", str(baseline_port)],
                      f"http://127.0.0.1:{baseline_port}", root / "baseline.log",
                      env={"BENCH_WEBHOOK_SECRET": WEBHOOK_SECRET}).start()
    template = delivery_template()
    deliveries = Deliveries(template, WEBHOOK_SECRET.encode())
    servers = {"baseline": Replicas([baseline]), "deploybot": bots}
    steps: list[StepResult] = []
    memory = {"idle_rss": 0.0, "load_rss": 0.0, "end_rss": 0.0, "hwm": 0.0}
    sampler = RssSampler(bot.pid)
    try:
        idle_cpu = [_idle_cpu(bot, 2.0), 0.0]
        memory["idle_rss"] = bot.memory_mb()["VmRSS"]
        plan = [(f"{rate:g}/s", rate) for rate in rates] + [("max", None)]
        if again_rate:
            plan.append((f"{again_rate:g}/s again", again_rate))
        for label, rate in plan:
            for name in ("baseline", "deploybot"):
                server = servers[name]
                result = StepResult(name, label, rate)
                if name == "deploybot":
                    result.stored_before = _stored(world.database)
                cpu0 = server.cpu_seconds()
                client0 = time.process_time()
                sampler.take()
                urls = [f"{url}/webhooks/github" for url in server.urls]
                if rate is None:
                    asyncio.run(closed_loop(client, urls, deliveries, result, max_seconds, concurrency))
                else:
                    asyncio.run(open_loop(client, urls, deliveries, result, rate, step_seconds, concurrency))
                result.client_cpu_s = time.process_time() - client0
                if name == "deploybot":
                    result.drain_s = _wait_dispatched(world.database, timeout=300)
                    result.peak_rss_mb = sampler.take()
                    memory["load_rss"] = max(memory["load_rss"], result.peak_rss_mb)
                result.server_cpu_s = server.cpu_seconds() - cpu0
                steps.append(result)
                say(f"  intake {label:>6} {name:<9}: {result.ok}/{result.sent} ok, "
                    f"{result.throughput:6.0f}/s, p50 {result.p(50):6.1f} ms, p99 {result.p(99):7.1f} ms"
                    + (f", drain {result.drain_s:.1f}s, {result.stored_before} stored before"
                       if name == "deploybot" else "")
                    + (f", errors e.g. {result.error_samples[0]}" if result.error_samples else ""))
        idle_cpu[1] = _idle_cpu(bot, 2.0)
        memory["end_rss"] = bot.memory_mb()["VmRSS"]
        memory["hwm"] = bot.memory_mb()["VmHWM"]
        accepted_ids = [i for s in steps if s.server == "deploybot" for i in s.ok_ids]
        persisted, dispatched_ok = _count_persisted(world.database, accepted_ids)
        scan = _pending_scan(world.database)
    finally:
        sampler.stop()
        baseline.stop()
        for replica in bots.servers[1:]:
            replica.stop()
        world.close()
    return IntakeReport(steps, memory, persisted, dispatched_ok, len(accepted_ids), len(template),
                        concurrency, log_level, client, *scan, *idle_cpu,
                        backend="PostgreSQL" if database_url else "SQLite", replicas=replicas)


def replica_config(config_path: Path, number: int) -> Path:
    """A copy of a bot's config for replica `number`: its own port and data dir, the same store."""
    config = yaml.safe_load(config_path.read_text())
    port = _free_port()
    config["server"].update(port=port, public_url=f"http://127.0.0.1:{port}",
                            data_dir=f"{config['server']['data_dir']}-{number}")
    path = config_path.with_name(f"config-{number}.yaml")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _count_persisted(db_path: Path | str, delivery_ids: list[str]) -> tuple[int, int]:
    """How many of the acknowledged deliveries the store holds, and how many were dispatched cleanly."""
    store = Store(db_path)
    try:
        statuses = [store.delivery_status(i) for i in delivery_ids]
    finally:
        store.close()
    return sum(s is not None for s in statuses), sum(s == "done" for s in statuses)


def _pending_scan(db_path: Path | str) -> tuple[int, float]:
    """How many deliveries the store holds, and how long the dispatcher's query for pending ones takes."""
    store = Store(db_path)
    try:
        best = math.inf
        for _ in range(3):
            started = time.perf_counter()
            store.claim_delivery(time.time())
            best = min(best, time.perf_counter() - started)
    finally:
        store.close()
    return _stored(db_path), 1000 * best


def _stored(database: Path | str) -> int:
    """How many deliveries the bot's store holds."""
    store = Store(database)
    try:
        with store._db() as db:
            return db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]
    finally:
        store.close()


def _free_port() -> int:
    from bot.sandbox.trial import free_port

    return free_port()
