"""`tollgate`: serve the ext_proc, run the local stack, check policies, render Envoy's config."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from datetime import date, datetime, timezone
from pathlib import Path

DEFAULT_POLICIES = os.environ.get("TOLLGATE_POLICIES", "policies")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tollgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the ext_proc gRPC server")
    p.add_argument("--policies", default=DEFAULT_POLICIES)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=int(os.environ.get("TOLLGATE_EXTPROC_PORT", "50051")),
                   help="the ext_proc gRPC port; worker i of --workers listens on --port + i")
    p.add_argument("--workers", type=_workers_arg, default=1, metavar="N",
                   help="run N ext_proc processes (0 or 'auto': one per core) under a parent that restarts "
                        "one that dies and forwards SIGTERM, SIGINT and SIGHUP; worker i uses --port + i, "
                        "--admin-port + i and --metrics-port + i, each an endpoint of Envoy's ext_proc "
                        "cluster (tollgate envoy-config --workers N lists them). Default 1: no parent")
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # set by the --workers parent
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6380/0"))
    p.add_argument("--state-dir", default=os.environ.get("TOLLGATE_STATE_DIR", ".run/state"),
                   help="local state that must survive a restart: the settle outbox (outbox-<port>.sqlite), "
                        "the attribution record files (attribution/), the admin access log "
                        "(admin-access.jsonl) and the alert delivery log (alerts-delivery.jsonl); the workers "
                        "of --workers share it (files are per port)")
    p.add_argument("--drain-seconds", type=float, default=2.5,
                   help="on SIGTERM: keep taking new streams this long after reporting NOT_SERVING, until "
                        "Envoy's health check has taken this process out")
    p.add_argument("--shutdown-grace-seconds", type=float, default=30.0,
                   help="then: how long in-flight requests may take to finish (the rest are settled as "
                        "interrupted)")
    p.add_argument("--xds-dir", default=os.environ.get("TOLLGATE_XDS_DIR"),
                   help="where Envoy watches its provider clusters and routes (file-based xDS): rewritten "
                        "on each policy reload")
    p.add_argument("--metrics-port", type=int, default=int(os.environ.get("TOLLGATE_METRICS_PORT", "9464")),
                   help="Prometheus /metrics on loopback (0 = off); worker i: --metrics-port + i")
    p.add_argument("--admin-port", type=int, default=_env_int("TOLLGATE_EXTPROC_ADMIN_PORT"),
                   help="port of the admin API's gRPC server (Envoy transcodes it to JSON); 0 turns it off; "
                        "worker i: --admin-port + i (default 50052 with one worker, else --port + N)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("run", help="run the whole local stack in the foreground (Ctrl-C stops it)")
    p.add_argument("--policies", default=DEFAULT_POLICIES)
    p.add_argument("--run-dir", default=".run")
    p.add_argument("--workers", type=_workers_arg, default=os.environ.get("TOLLGATE_WORKERS", "auto"), metavar="N",
                   help="ext_proc processes (default $TOLLGATE_WORKERS, else 'auto': one per core), on "
                        "TOLLGATE_EXTPROC_PORT + i, TOLLGATE_EXTPROC_ADMIN_PORT + i, TOLLGATE_METRICS_PORT + i")
    p.set_defaults(func=_run)

    p = sub.add_parser("check", help="validate a policy directory; exit 1 on any problem")
    p.add_argument("policies", nargs="?", default=DEFAULT_POLICIES)
    p.set_defaults(func=_check)

    p = sub.add_parser("prices", help="the rates in force today (or --at DATE) for every priced model")
    p.add_argument("--policies", default=DEFAULT_POLICIES)
    p.add_argument("--at", help="a day, YYYY-MM-DD (UTC; default: today)")
    p.add_argument("--model", default="*", help="glob on the table's names, e.g. 'claude-*'")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(func=_prices)

    p = sub.add_parser("envoy-config", help="print the Envoy bootstrap for a policy directory")
    p.add_argument("--policies", default=DEFAULT_POLICIES)
    p.add_argument("--listen-port", type=int, default=int(os.environ.get("TOLLGATE_PORT", "8080")))
    p.add_argument("--admin-port", type=int, default=9901)
    p.add_argument("--extproc-port", type=int, action="append")
    p.add_argument("--admin-api-port", type=int, default=int(os.environ.get("TOLLGATE_ADMIN_API_PORT", "8081")),
                   help="Envoy's admin API listener (JSON over HTTP, loopback)")
    p.add_argument("--extproc-admin-port", type=int, action="append",
                   help="the ext_proc admin gRPC port(s), one per --extproc-port (default 50052)")
    p.add_argument("--workers", type=_workers_arg, metavar="N",
                   help="list the N ports of `tollgate serve --workers N`: --extproc-port + i and "
                        "--extproc-admin-port + i (default: 50052 for one, else --extproc-port + N); one of each at most")
    p.add_argument("--access-log", default="/dev/stdout")
    p.add_argument("--admin-access-log", default="/dev/stdout", help="Envoy's access log of the admin API listener")
    p.add_argument("--xds-dir", help="write the providers' clusters and routes there as file-based xDS (which "
                                     "`tollgate serve --xds-dir` rewrites on reload) and point the bootstrap at "
                                     "them; without it they are inlined")
    p.set_defaults(func=_envoy_config)

    p = sub.add_parser("report", help="spend and tokens by user, team, model, ... over a date range (reads Redis)")
    p.add_argument("--by", default="team",
                   help="comma-separated: user,team,app,group,model,provider,service_token; day: one row per UTC day")
    p.add_argument("--from", dest="start", help="first day, YYYY-MM-DD (UTC; default: the first of this month)")
    p.add_argument("--to", dest="end", help="last day, YYYY-MM-DD (UTC; default: today)")
    p.add_argument("--where", action="append", default=[], metavar="DIM=VALUE", help="filter, e.g. team=ml")
    p.add_argument("--sort", default="cost_usd", help="column to sort by, descending; prefix + for ascending")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6380/0"))
    p.set_defaults(func=_report)

    p = sub.add_parser("budgets", help="every live budget counter: spent, reserved, limit, percent, reset")
    p.add_argument("--where", action="append", default=[], metavar="ATTR=VALUE", help="e.g. user=alice@example.com")
    p.add_argument("--sort", default="percent")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6380/0"))
    p.add_argument("--forecast", action="store_true",
                   help="add each calendar counter's burn-rate forecast: projected spend at the period's end "
                        "(low-high band), the date it would run out (docs/dashboard.md); reads --policies")
    p.add_argument("--policies", default=DEFAULT_POLICIES, help="with --forecast: the budgets' scopes and windows")
    p.set_defaults(func=_budgets)

    p = sub.add_parser("simulate", help="what the gateway would do with one request, for a policy directory "
                                        "against the live budget counters (reads Redis, writes nothing)")
    p.add_argument("--policies", default=DEFAULT_POLICIES, help="the (candidate) policy directory")
    p.add_argument("--as", dest="identity", action="append", default=[], metavar="ATTR=VALUE",
                   help="an identity attribute, repeatable: --as user=alice --as groups=interns --as groups=eng "
                        "(groups is a list; metadata such as run=... too)")
    p.add_argument("--model", required=True)
    p.add_argument("--path", help="the request path (default /v1/chat/completions; /v1/messages when only an "
                                  "Anthropic-wire provider serves the model)")
    p.add_argument("--max-tokens", type=int, help="the request's output cap (default: unset, the model's maximum)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--input-bytes", type=int, help="the request body's size (default 1024)")
    size.add_argument("--input-tokens", type=int, help="the input bound in tokens, instead of --input-bytes")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6380/0"))
    p.set_defaults(func=_simulate)

    p = sub.add_parser("hash-key", help="print the sha256 to store in a policy for an API key or secret")
    p.add_argument("secret")
    p.set_defaults(func=lambda a: print(__import__("extproc.identity", fromlist=["hash_secret"]).hash_secret(a.secret)))

    p = sub.add_parser("fake-provider", help="run the fake OpenAI/Anthropic provider")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: __import__("extproc.fakeprovider.server", fromlist=["main"]).main(a.args))

    args = parser.parse_args(argv)
    args.func(args)


def _workers_arg(text: str) -> int:
    from .workers import parse_workers

    return parse_workers(text)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def _load(policies: str):
    from .config import load_config
    from .policy_yaml import PolicyError

    try:
        return load_config(policies)
    except PolicyError as e:
        print(f"tollgate: policy errors in {policies}:", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        sys.exit(1)


STALE_PRICE_DAYS = 90


def _check(args: argparse.Namespace) -> None:
    config = _load(args.policies)
    print(f"{args.policies}: OK ({len(config.doc.prices.models)} prices, {len(config.providers)} providers, "
          f"{len(config.doc.budgets)} budgets)")
    today = datetime.now(timezone.utc).date()
    stale = config.prices.stale(today, STALE_PRICE_DAYS)
    from .simulate import policy_summary

    print(policy_summary(config, stale=stale, today=today), flush=True)
    if stale:
        print(f"warning: {len(stale)} prices were last checked more than {STALE_PRICE_DAYS} days ago "
              "(check them against the provider and update `checked`):", file=sys.stderr)
        for name in stale:
            print(f"  {name}", file=sys.stderr)


def _simulate(args: argparse.Namespace) -> None:
    from .simulate import run_cli

    config = _load(args.policies)
    sys.exit(run_cli(config, args))


def _prices(args: argparse.Namespace) -> None:
    import fnmatch

    from .reports import render

    config = _load(args.policies)
    at = date.fromisoformat(args.at) if args.at else datetime.now(timezone.utc).date()
    rows = []
    for name, p in config.prices.entries(at):
        if not fnmatch.fnmatchcase(name, args.model):
            continue
        lc = p.long_context
        rows.append({"model": name, "input": p.input, "cached_input": p.cached_input, "cache_write": p.cache_write,
                     "cache_write_long": p.cache_write_long, "output": p.output,
                     "long_context": f">{lc.above_input_tokens}: {lc.input}/{lc.output}" if lc else None,
                     "tiers": "; ".join(f"{t} {r.input}/{r.output}" for t, r in p.tiers.items()) or None,
                     "inference_geo": "; ".join(f"{g} x{m}" for g, m in p.inference_geo.items()) or None,
                     "audio": f"{p.audio_input}/{p.audio_output}" if p.audio_input or p.audio_output else None,
                     "image": f"{p.image_input}/{p.image_output}" if p.image_input or p.image_output else None,
                     "effective": p.effective, "until": p.until, "checked": p.checked})
    columns = ["model", "input", "cached_input", "cache_write", "cache_write_long", "output", "long_context",
               "tiers", "inference_geo", "audio", "image", "effective", "until", "checked"]
    tools = ", ".join(f"{k} ${v}" for k, v in config.prices.tools.items())
    print(render(rows, columns, args.format, title=f"USD per million tokens in force on {at} (tools per call: {tools})"))


def _serve(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from . import workers

    if args.parent_pid:
        workers.exit_with_parent(args.parent_pid)
    config = _load(args.policies)
    if args.workers > 1:
        sys.exit(workers.serve_workers(args, args.workers))
    if args.admin_port is None:
        args.admin_port = workers.DEFAULT_ADMIN_PORT
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    from .app import build_gateway
    from .server import serve

    async def amain() -> None:
        from .attribution import RotatingJsonlSink, stdout_sink, tee

        state = Path(args.state_dir)
        # Records outlive the bounded Redis stream in rotated JSON-lines files, one writer per process.
        files = RotatingJsonlSink(state / "attribution", name=f"extproc-{args.port}")
        # The outbox too (outbox-<port>.sqlite), with the entries of outboxes no process holds.
        outbox = workers.OutboxClaim(state, args.port)
        outbox.adopt_orphans()
        gw = await build_gateway(config, redis_url=args.redis_url, outbox_path=outbox.path,
                                 sink=tee(stdout_sink(), files), state_dir=state,
                                 xds_dir=Path(args.xds_dir) if args.xds_dir else None)
        loop = asyncio.get_running_loop()
        replay = loop.create_task(gw.replay_outbox())
        sweep = loop.create_task(gw.sweep_leases())
        # Policy edits take effect without a restart: on a file change, and on SIGHUP.
        watch = loop.create_task(gw.watch_policies())
        alerts = loop.create_task(gw.run_alerts())  # webhooks about budget events (docs/alerts.md)
        if gw.xds_dir is not None:  # the typed Envoy classes take about 1 s to import: not at the first reload
            from .envoy_config import import_types

            loop.run_in_executor(None, import_types)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(gw.reload("SIGHUP")))
        gauges = None
        if args.metrics_port:
            gw.metrics_server = await gw.metrics.serve(args.host, args.metrics_port)
            gauges = asyncio.get_running_loop().create_task(gw.watch_shared_budgets())
        admin = None
        if args.admin_port:
            from .admin import service as admin_service
            from .server import AdminEndpoint

            admin = AdminEndpoint(lambda server: admin_service.add_to_server(gw, server),
                                  admin_service.SERVICE_NAME, args.host, args.admin_port)
        quiet_gc()
        await serve(gw.new_processor, args.host, args.port, on_stop=gw.close, admin=admin,
                    on_phase=gw.metrics.phase_latency, drain_seconds=args.drain_seconds,
                    grace_seconds=args.shutdown_grace_seconds)
        replay.cancel()
        sweep.cancel()
        watch.cancel()
        alerts.cancel()
        files.close()
        outbox.close()
        if gauges is not None:
            gauges.cancel()

    asyncio.run(amain())


def quiet_gc() -> None:
    """Keep the cyclic garbage collector off the hot path.

    Every request allocates a few hundred objects (protobuf messages, dicts, coroutines), nearly
    all freed by reference counting; with the default threshold (700) a generation-0 collection ran
    every few requests and walked the whole young heap each time: 4-9% of the ext_proc's CPU under
    load (py-spy --native, `gc_collect_main`). Everything alive once the server is ready (the
    policy, imported modules, compiled tables) is moved out of the collector's view (`gc.freeze`),
    and a young collection runs every 50,000 allocations net instead. Cycles are still collected;
    RSS is watched by `make bench` (`--long`).
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _pairs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            sys.exit(f"tollgate: --where wants DIM=VALUE, got {item!r}")
        out[k] = v
    return out


def _report(args: argparse.Namespace) -> None:
    import datetime as dt

    import redis.asyncio as aioredis

    from .reports import render, sort_rows, usage_rows
    from .usage import query_usage

    today = dt.datetime.now(dt.timezone.utc).date()
    try:
        start = dt.date.fromisoformat(args.start) if args.start else today.replace(day=1)
        end = dt.date.fromisoformat(args.end) if args.end else today
    except ValueError as e:
        sys.exit(f"tollgate: bad date: {e}")
    group_by = [d for d in args.by.split(",") if d]

    async def run():
        client = aioredis.Redis.from_url(args.redis_url, socket_connect_timeout=2)
        try:
            return await query_usage(client, group_by=group_by, start=start, end=end, where=_pairs(args.where))
        finally:
            await client.aclose()

    try:
        report = asyncio.run(run())
    except ValueError as e:
        sys.exit(f"tollgate: {e}")
    rows, totals, columns = usage_rows(report)
    title = f"spend by {', '.join(group_by) or 'everything'}, {start} to {end} (UTC)"
    sys.stdout.write(render(sort_rows(rows, args.sort), columns, args.format, title=title, totals=totals))


def _budgets(args: argparse.Namespace) -> None:
    import redis.asyncio as aioredis

    from .reports import BUDGET_COLUMNS, FORECAST_COLUMNS, add_forecasts, budget_counters, render, sort_rows

    budgets = _load(args.policies).doc.budgets if args.forecast else []

    async def run():
        client = aioredis.Redis.from_url(args.redis_url, socket_connect_timeout=2)
        try:
            rows = await budget_counters(client, where=_pairs(args.where))
            return await add_forecasts(client, rows, budgets) if args.forecast else rows
        finally:
            await client.aclose()

    rows = asyncio.run(run())
    columns = [*BUDGET_COLUMNS, *FORECAST_COLUMNS] if args.forecast else BUDGET_COLUMNS
    sys.stdout.write(render(sort_rows(rows, args.sort), columns, args.format, title="live budget counters"))


def _envoy_config(args: argparse.Namespace) -> None:
    import yaml

    from .envoy_config import EnvoyPorts, render

    config = _load(args.policies)
    extproc, extproc_admin = args.extproc_port or [50051], args.extproc_admin_port or [50052]
    if args.workers is not None:  # the ports `serve --workers N --port P --admin-port A` listens on
        from .workers import worker_ports

        if len(extproc) > 1 or len(args.extproc_admin_port or []) > 1:
            sys.exit("tollgate: with --workers, give the first worker's --extproc-port / --extproc-admin-port only")
        try:
            layout = worker_ports(args.workers, extproc[0], (args.extproc_admin_port or [None])[0])
        except ValueError as e:
            sys.exit(f"tollgate: {e}")
        extproc, extproc_admin = [w.port for w in layout], [w.admin for w in layout]
    ports = EnvoyPorts(listen=args.listen_port, admin=args.admin_port, extproc=extproc,
                       admin_api=args.admin_api_port, extproc_admin=extproc_admin,
                       access_log=args.access_log, admin_access_log=args.admin_access_log,
                       xds_dir=str(Path(args.xds_dir).resolve()) if args.xds_dir else None)
    if args.xds_dir:
        from .envoy_config import write_xds

        write_xds(config, Path(args.xds_dir))
    sys.stdout.write(yaml.safe_dump(render(config, ports), sort_keys=False))


def _say(text: str, err: bool = False) -> None:
    """Print, but never let a closed terminal (SIGHUP) break the cleanup that follows."""
    try:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)
    except (OSError, ValueError):
        pass


def _run(args: argparse.Namespace) -> None:
    """The local stack in the foreground: restart a dead ext_proc, stop everything on a signal.

    The signal handlers go in first, before the slow imports and the policy load, so a signal
    at any point stops whatever has been started by then (Stack.start polls for it).
    """
    from .supervisor import StopSignals

    stop = StopSignals().install()
    from .procs import Interrupted
    from .stack import Stack, StackPorts
    from .supervisor import supervise

    _load(args.policies)
    redis_url = os.environ.get("REDIS_URL") or None
    try:
        ports = StackPorts.from_env(extproc_count=args.workers)
    except ValueError as e:  # overlapping port ranges
        _say(f"tollgate: {e}", err=True)
        sys.exit(2)
    stack = Stack(Path(args.policies), Path(args.run_dir).resolve(), ports, redis_url=redis_url,
                  extproc_stdout_to_terminal=True, should_stop=stop.requested)
    n = len(ports.extproc)
    _say(f"tollgate: starting Redis, fake provider, {n} ext_proc{'s' if n > 1 else ''} and Envoy "
         f"(logs in {stack.run_dir}/) ...")
    try:
        try:
            stack.start()
        except (RuntimeError, TimeoutError, OSError) as e:  # a child that exited or never listened
            _say(f"tollgate: the stack did not start: {e}", err=True)
            sys.exit(1)
        _say(
            f"\ntollgate is up. Send OpenAI or Anthropic SDK requests to {stack.base_url}/v1\n"
            f"  policies:        {Path(args.policies).resolve()}\n"
            f"  redis:           {stack.redis_url}\n"
            f"  envoy admin:     http://127.0.0.1:{stack.ports.admin}\n"
            f"  ext_procs:       {n} on ports {', '.join(map(str, ports.extproc))} "
            f"(admin gRPC {', '.join(map(str, ports.extproc_admin))}; metrics {', '.join(map(str, ports.metrics))})\n"
            f"  admin API:       http://127.0.0.1:{stack.ports.admin_api}/admin/v1/budgets (JSON; see README)\n"
            f"  access log:      {stack.access_log}\n"
            f"  admin API logs:  {stack.envoy_admin_access_log} (Envoy), {stack.admin_access_log} (who read what)\n"
            f"Attribution records follow, one JSON line per request. Ctrl-C stops everything.\n"
        )
        supervisor = supervise(stack)
        while not stop.requested():
            death = supervisor.poll()
            if death is not None:
                _say(f"tollgate: {death}; stopping the stack", err=True)
                sys.exit(1)
            time.sleep(0.1)
    except Interrupted:  # the signal came while the stack was starting or an ext_proc restarting
        pass
    finally:
        if stop.received is not None:
            _say(f"\ntollgate: {stop.received.name}; stopping ...")
        stack.stop()


if __name__ == "__main__":
    main()
