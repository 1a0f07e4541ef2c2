"""deploybot benchmarks: one command, every figure a ratio against a baseline measured in the same run.

    python -m bench            # full run, a few minutes
    python -m bench --quick    # smoke run, about a minute
    python bench/run.py ...    # the same

Prints progress, then a Markdown report (summary table first); `--markdown FILE`
also writes the report to a file. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SECTIONS = ("intake", "intake-postgres", "plan", "fanout", "isolation", "decision")
# The PostgreSQL server the intake-postgres section uses, in a schema of its own (dropped after).
BENCH_DATABASE_URL = os.environ.get("DEPLOYBOT_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (< 90 s): short intake steps, 1 plan round, 1 fan-out round")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (default: {','.join(SECTIONS)})")
    g = parser.add_argument_group("intake")
    g.add_argument("--rates", type=_floats, default=[100, 250, 500],
                   help="open-loop rates in deliveries/s (default 100,250,500)")
    g.add_argument("--step-seconds", type=float, help="seconds per rate step (default 5; quick 1.5)")
    g.add_argument("--max-seconds", type=float, help="seconds of the closed-loop saturation step (default 5; quick 1.5)")
    g.add_argument("--concurrency", type=int, default=32, help="requests in flight at most (default 32)")
    g.add_argument("--client", choices=["raw", "httpx"], default="raw",
                   help="load generator's HTTP client (default raw asyncio; httpx costs ~4.5 ms of CPU a request)")
    g.add_argument("--judge-rate", type=float, default=500, help="the rate the targets are judged at (default 500)")
    g.add_argument("--no-again", action="store_true",
                   help="skip repeating the judged rate at the end (against the bot's fuller store)")
    g = parser.add_argument_group("plans")
    g.add_argument("--plan-rounds", type=int, help="alternating bot/bare rounds (default 7; quick 1)")
    g.add_argument("--claim-rounds", type=int, help="jobs claimed across replicas (default 40; quick 5)")
    g.add_argument("--decision-sizes", help="projects in the monorepo decision (default 100,1000,3000; quick 100,1000)")
    g.add_argument("--no-trace", action="store_true", help="skip the traced round (git/terraform wrappers)")
    g.add_argument("--fanout-sizes", type=_ints, default=[1, 4, 16], help="projects per PR (default 1,4,16)")
    g.add_argument("--fanout-rounds", type=int, help="rounds over the sizes (default 3; quick 1)")
    g.add_argument("--parallelism", type=_ints,
                   help="terraform.parallelism values of the bot, one fan-out run each "
                        "(default: this machine's core count, then 4)")
    g = parser.add_argument_group("general")
    g.add_argument("--bot-log-level", default="info", help="`deploybot serve --log-level` (default info, its default)")
    g.add_argument("--workdir", help="where to put worlds, logs and databases (default: a temp dir)")
    g.add_argument("--keep", action="store_true", help="keep the work dir afterwards")
    g.add_argument("--markdown", help="also write the report to this file")
    args = parser.parse_args(argv)
    quick = args.quick
    args.step_seconds = args.step_seconds or (1.5 if quick else 5.0)
    args.max_seconds = args.max_seconds or (1.5 if quick else 5.0)
    args.plan_rounds = args.plan_rounds or (1 if quick else 7)
    args.claim_rounds = args.claim_rounds or (5 if quick else 40)
    args.decision_sizes = [int(n) for n in (args.decision_sizes or ("100,1000" if quick else "100,1000,3000")).split(",")]
    args.fanout_rounds = args.fanout_rounds or (1 if quick else 3)
    args.parallelism = args.parallelism or sorted({os.cpu_count() or 1, 4})
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    if 1 not in args.fanout_sizes:
        args.fanout_sizes = [1, *args.fanout_sizes]  # the reference every other size is judged by
    return args


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def environment() -> str:
    from bot.jobs.terraform import find_terraform

    version = subprocess.run([find_terraform(), "version"], capture_output=True, text=True).stdout.split("\n")[0]
    load = os.getloadavg()
    return (f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {platform.machine()} with {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, {version}, git "
            f"{subprocess.run(['git', '--version'], capture_output=True, text=True).stdout.split()[-1]}, "
            f"load average at start {load[0]:.2f}")


@contextlib.contextmanager
def postgres_schema(url: str):
    """A fresh schema in the PostgreSQL database at `url` (its URL), dropped afterwards; None if unreachable."""
    import uuid

    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(url, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError:
        yield None
        return
    with admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            yield f"{url}?search_path={schema}"
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench import decision, intake, isolation, plans, replicas, report
    from bench.common import CpuWatch

    root = Path(args.workdir or tempfile.mkdtemp(prefix="deploybot-bench-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    env = environment()
    _say(f"deploybot bench in {root} ({'quick' if args.quick else 'full'} run)")
    rows, details = [], []
    loads: dict[str, tuple[float, float]] = {}  # section -> cores used by the bench, by other processes
    plugin_cache = root / "plugin-cache"  # shared by the plan and fan-out worlds, as by one bot's projects

    def section(name: str, title: str) -> str:
        ours, others = loads[name]
        return f"### {title}\n\nCPU during this section: the bench {ours:.2f} cores, other processes {others:.2f} cores."

    try:
        if "intake" in args.only:
            _say("intake: baseline and deploybot, step by step")
            watch = CpuWatch()
            judged = args.judge_rate if args.judge_rate in args.rates else max(args.rates)
            result = intake.run(root / "intake", args.rates, args.step_seconds, args.max_seconds, args.concurrency,
                                log_level=args.bot_log_level, client=args.client,
                                again_rate=None if args.no_again else judged, say=_say)
            loads["intake"] = watch.stop()
            rows += report.intake_rows(result, judged)
            details.append(section("intake", "1 and 4. Webhook intake and memory") + "\n\n"
                           + report.intake_details(result))
        if "intake-postgres" in args.only:
            for count in (1, 2):
                _say(f"intake on PostgreSQL, {count} replica(s): baseline and deploybot, step by step")
                watch = CpuWatch()
                judged = args.judge_rate if args.judge_rate in args.rates else max(args.rates)
                name = "intake-postgres" if count == 1 else "intake-replicas"
                with postgres_schema(BENCH_DATABASE_URL) as url:
                    if url is None:
                        _say(f"  skipped: PostgreSQL is not reachable at {BENCH_DATABASE_URL}")
                        break
                    result = intake.run(root / name, args.rates, args.step_seconds, args.max_seconds,
                                        args.concurrency, log_level=args.bot_log_level, client=args.client,
                                        again_rate=None if args.no_again else judged, say=_say, database_url=url,
                                        replicas=count)
                    loads[name] = watch.stop()
                    rows += report.intake_rows(result, judged)
                    title = ("1b. Webhook intake, the bot on PostgreSQL" if count == 1 else
                             "1c. Webhook intake, two replicas of the bot on PostgreSQL (the load spread over both)")
                    details.append(section(name, title) + "\n\n" + report.intake_details(result))
            _say("job claims across replicas: queued by one, claimed by the other")
            watch = CpuWatch()
            with postgres_schema(BENCH_DATABASE_URL) as url:
                if url is not None:
                    result = replicas.run(root / "claims", url, args.claim_rounds, log_level=args.bot_log_level,
                                          say=_say)
                    loads["claims"] = watch.stop()
                    rows += report.claim_rows(result)
                    details.append(section("claims", "1d. Job claim latency across replicas") + "\n\n"
                                   + report.claim_details(result))
        if "plan" in args.only:
            _say("plan overhead: bot vs bare terraform, alternating")
            watch = CpuWatch()
            result = plans.run_plan(root / "plan", args.plan_rounds, plugin_cache, trace=not args.no_trace,
                                    log_level=args.bot_log_level, say=_say)
            loads["plan"] = watch.stop()
            rows += report.plan_rows(result)
            details.append(section("plan", "2. Plan overhead") + "\n\n" + report.plan_details(result))
        if "fanout" in args.only:
            fanouts = []
            watch = CpuWatch()
            for parallelism in args.parallelism:
                _say(f"fan-out: one PR touching 1..N projects, parallelism {parallelism}")
                fanouts.append(plans.run_fanout(root / f"fanout-{parallelism}", args.fanout_sizes,
                                                args.fanout_rounds, parallelism, plugin_cache,
                                                log_level=args.bot_log_level, say=_say))
            loads["fanout"] = watch.stop()
            for result in fanouts:
                rows += report.fanout_rows(result)
            details.append(section("fanout", "3. Fan-out") + "\n\n"
                           + "\n\n".join(report.fanout_details(result) for result in fanouts))
        if "isolation" in args.only:
            _say("isolation: a job in its sandbox vs none; through a runner vs in the bot; fan-out over runners")
            watch = CpuWatch()
            result = isolation.run(root / "isolation", args.plan_rounds, args.fanout_rounds,
                                   log_level=args.bot_log_level, say=_say)
            loads["isolation"] = watch.stop()
            rows += report.isolation_rows(result)
            details.append(section("isolation", "5. Sandbox and runners") + "\n\n" + report.isolation_details(result))
        if "decision" in args.only:
            _say("decision: a pull request changing the module every project of a monorepo uses")
            watch = CpuWatch()
            result = decision.run(root / "decision", args.decision_sizes, log_level=args.bot_log_level, say=_say)
            loads["decision"] = watch.stop()
            rows += report.decision_rows(result)
            details.append(section("decision", "6. Monorepo decision") + "\n\n" + report.decision_details(result))
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    busy = [f"{name} ({others:.2f} cores)" for name, (_, others) in loads.items() if others > 0.25]
    warning = (f"⚠️ Other processes used the machine's {os.cpu_count()} cores during: {', '.join(busy)}; "
               "treat those figures with care or run again." if busy else "")
    load = os.getloadavg()[0]
    elapsed = time.monotonic() - started
    text = "\n\n".join([
        f"## deploybot benchmark ({'quick' if args.quick else 'full'} run)",
        f"{env}; load average at end {load:.2f}; took {elapsed:.0f} s.",
        *([warning] if warning else []),
        report.summary(rows),
        *details,
    ]) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
