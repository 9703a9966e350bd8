"""Every defence at once (``--only attack``) and descriptor churn (``--only fdchurn``): issue 18.

``attack``: the canary, ``subscribers`` WebSocket subscribers at ``rate`` msg/s for ``seconds``,
runs twice against stream with the same settings: quiet, then while bench/attacker.py runs items
5-11, 16 and 17 at once (bench/attacks.py says what each socket does). The server runs under
``ulimit -n`` a little above max_connections + fd_margin, so the flood of idle sockets (11)
takes it to its descriptor cap, and its pool polls an upstream (``harness.Upstream``) that needs
a new socket for every poll. The verdicts:

- the canary's p99 under attack is at most twice the quiet run's, or 50 ms, whichever is
  larger; and nothing is lost;
- the server's RSS stays under 512 MiB;
- every socket is released within write_stall_timeout + 5 s after the attacker stops: the
  server holds no descriptor for a connection from an attacker's address (/proc), and
  ``stream_sockets`` counts no more sockets than it holds descriptors for;
- the pool still works: no poll failed, and the upstream got at least 90 % as many polls as in
  the quiet run.

``fdchurn`` (18): idle sockets, each reopened as soon as the server closes it, against stream
under ``ulimit -n 1024``; a fresh /healthz every 0.2 s must be answered (95 %).

Timing verdicts are ratios against the quiet run of the same command, never absolute times.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import httpx
from attacks import SOURCES  # bench/ is this script's directory, so it is on sys.path
from harness import BENCH, STREAM, Attacker, Clients, Probe, RunningServer, Upstream, http_status, publish, websocket_greeting
from results import Result, RssWatch, group_line, record, socket_metrics

__all__ = ["DEFENCES", "QUICK_DEFENCES", "Defences", "FdChurn", "attack_summary", "defended", "fd_churn"]

# Groups the hostile scenario runs, left out of the attack and fdchurn scenarios.
NO_HOSTILE = {"trickle": 0, "idle": 0, "snapshot": 0, "churn": 0}
CANARY_PROCESSES = 4  # the canary's sockets spread over 127.0.0.1-4: each address under 1 % of max_connections
NEWCOMER = "127.0.0.5"  # the canary's own new connections during the run (a canary address nobody else uses)
# The canary's addresses; this harness's own requests (publishing, /metrics) come from 127.0.0.1.
OURS = frozenset({*(f"127.0.0.{n}" for n in range(1, CANARY_PROCESSES + 1)), NEWCOMER})
FD_MARGIN = 100  # stream's default fd_margin
OWN_DESCRIPTORS = 20  # beyond fd_margin: the server's listening socket, epoll, log, pool
UPSTREAM = "upstream"  # the provider polling harness.Upstream
RSS_BOUND_MB = 512
P99_FLOOR_MS = 50.0
POLLS_SHARE = 0.9
HEALTHZ_TARGET = 0.95
DEFENCE_METRICS = ("stream_sockets", "stream_connections", "stream_ws_ops", "stream_subscriptions", "stream_publish_refused",
                   "stream_history_bytes", "stream_history_events", "stream_retained_topics", "stream_pending_events",
                   "stream_dropped_events", "stream_slow_consumer_disconnects", "stream_provider_polls")


@dataclass(frozen=True)
class Defences:
    """The ``attack`` scenario: the canary, the attacked server's limits (the quiet run gets the
    same) and the sizes of bench/attacker.py's groups that do not follow from those limits."""

    subscribers: int
    rate: float
    seconds: float
    max_connections: int
    per_client: int
    write_stall: float  # seconds; a socket the server lets go of is gone within it
    sizes: dict[str, float]

    def env(self) -> dict[str, str]:
        return {"STREAM_MAX_CONNECTIONS": str(self.max_connections), "STREAM_MAX_CONNECTIONS_PER_CLIENT": str(self.per_client),
                "STREAM_WRITE_STALL_TIMEOUT": f"{self.write_stall:g}", "STREAM_FORWARDED_ALLOW_IPS": SOURCES["forwarded_v4"][0]}

    def nofile(self) -> int:
        """The server's ``ulimit -n``: sockets are still served up to max_connections, and the
        descriptor cap (about max_connections + fd_margin / 2) is within the flood's reach."""
        return self.max_connections + FD_MARGIN + OWN_DESCRIPTORS

    def attack(self) -> dict[str, float]:
        past = round(self.per_client * 1.1)  # (11): a tenth past the per-client limit, for each forwarded client
        return {**NO_HOSTILE, **self.sizes, "forwarded": past, "forwarded_v6": past, "fill": self.max_connections}

    def release_bound(self) -> float:
        return self.write_stall + 5

    def release_watch(self) -> float:
        """How long the release is watched for: what is still held then is reported."""
        return 2 * self.release_bound()


DEFENCES = Defences(100, 10, 60, max_connections=3000, per_client=300, write_stall=10, sizes={
    "topics": 20_000, "batch": 200, "unread": 42, "gone_rate": 100, "continuation": 4, "anonymous_publish": 4, "big_head": 4,
    "giant": 4, "fd_flood": 600})
QUICK_DEFENCES = Defences(20, 10, 4, max_connections=1000, per_client=60, write_stall=2, sizes={
    "topics": 2000, "batch": 20, "unread": 14, "gone_rate": 20, "continuation": 2, "anonymous_publish": 2, "big_head": 2,
    "giant": 2, "fd_flood": 360})


@dataclass(frozen=True)
class FdChurn:
    """The ``fdchurn`` scenario: ``sockets`` idle sockets against a server under ``ulimit -n
    nofile``, and a fresh /healthz every ``every`` seconds that must be answered within ``timeout``."""

    sockets: int = 1100
    seconds: float = 30
    nofile: int = 1024
    every: float = 0.2
    timeout: float = 1.0


def _refused(metrics: dict[str, float], reason: str) -> float:
    return metrics.get(f'stream_sockets_refused_total{{reason="{reason}"}}', 0) + metrics.get(f'stream_sockets_closed_total{{reason="{reason}"}}', 0)


# What shows that a group reached the defence it probes (its size alone may not: a refusal is
# the point), from its report and the server's metrics at the end.
REACHED = {
    "batch_stalled": lambda g, m: g["held_peak"] >= 0.9 * g["target"] and g.get("batches_202", 0) > 0,
    "unread_close": lambda g, m: g["closed_by_server"] > 0,
    "gone_long_polls": lambda g, m: g.get("requests_sent", 0) > 0,
    "empty_continuation": lambda g, m: g["close_codes"].get("1008", 0) > 0,
    "anonymous_publish": lambda g, m: g["statuses"].get("401", 0) > 0,
    "big_head": lambda g, m: g["statuses"].get("431", 0) > 0,
    "forwarded_v4": lambda g, m: g.get("refused_per_client", 0) > 0,
    "forwarded_v6": lambda g, m: g.get("refused_per_client", 0) > 0,
    "fd_flood": lambda g, m: _refused(m, "fd_margin") + _refused(m, "evicted") > 0,
    "giant_subscribe": lambda g, m: g.get("error_too_many_subscriptions", 0) > 0,
    "fill": lambda g, m: g["close_codes"].get("1013", 0) > 0,
}
LABELS = {
    "batch_stalled": "(5) batches to subscribers that stopped reading",
    "unread_close": "(6) closed sockets whose answer sits unread",
    "gone_long_polls": "(7) long-polls whose sockets leave at once",
    "empty_continuation": "(8) empty continuation frames",
    "anonymous_publish": "(9) anonymous 1 MiB publish bodies",
    "big_head": "(10) 100 KiB heads in one write",
    "forwarded_v4": "(11) a trusted proxy for one IPv4 client",
    "forwarded_v6": "(11) a trusted proxy for one IPv6 /64",
    "fd_flood": "(11) idle sockets up to the descriptor cap",
    "giant_subscribe": "(16) refused 5,000-pattern subscribes",
    "fill": "(17) twelve addresses filling the limit",
    "fd_churn": "(18) idle sockets reopened at once",
}
STANDARD = {"source", "target", "held_peak", "held_mean", "held_min", "held_at_stop", "connects", "connect_failed",
            "closed_by_server", "let_go_after_s", "statuses", "close_codes"}


def _owners() -> dict[str, str]:
    """The attacker's group (or groups) by source address."""
    owners: dict[str, str] = {}
    for name, addresses in SOURCES.items():
        for address in addresses:
            owners[address] = f"{owners[address]}+{name}" if address in owners else name
    return owners


# -- the attack scenario ------------------------------------------------------------------


def defended(plan: Defences, attacked: bool) -> Result:
    """The canary (``plan.subscribers`` WebSocket subscribers at ``plan.rate`` msg/s for
    ``plan.seconds``), alone or with every group of ``plan.attack()`` running from before the
    measurement to its end. Besides the canary's deliveries: RSS, what the canary's new
    connections were told meanwhile, the upstream's polls, how soon every attacker socket was
    released once the attacker stopped, and the server's log."""
    result = Result("attack" if attacked else "attack-quiet", STREAM.name, "ws", plan.subscribers, plan.rate, plan.seconds)
    upstream = Upstream()
    with tempfile.NamedTemporaryFile("w", prefix="stream-attack-", suffix=".toml", delete=False) as config:
        config.write((BENCH / "stream.toml").read_text() + upstream.provider(UPSTREAM))
    server = None
    attacker = None
    try:
        server = RunningServer(replace(STREAM, config=Path(config.name)), plan.env(), nofile=plan.nofile())
        time.sleep(0.5)
        clients = Clients(server, "ws", plan.subscribers, CANARY_PROCESSES)
        result.connect_s = round(clients.connect_seconds, 2)
        watch = RssWatch(server)
        if attacked:
            attacker = Attacker(server, plan.attack(), duration=plan.seconds + 60)
            result.extra["attacker_ready"] = attacker.wait_ready()
            # The attack under way before the measurement starts; its flood (11) comes two
            # seconds later, once the publisher's and the first newcomer's connections are open.
            time.sleep(1.0)
        result.extra["load_average_1m"] = round(os.getloadavg()[0], 2)
        newcomers = Probe(lambda: websocket_greeting(server.url, "/ws", NEWCOMER, 2.0), every=1.0, limit=plan.seconds + 30)
        polled = upstream.requests["GET"]
        before = server.cpu()
        published, behind = asyncio.run(publish(server.url, plan.rate, plan.seconds))
        result.extra["upstream_polled"] = upstream.requests["GET"] - polled
        result.extra["newcomers"] = dict(newcomers.stop())
        if attacker is not None:
            known = server.connections()
            stopped = time.monotonic()
            result.extra["attacker"] = attacker.stop()
            attacker = None
            result.extra["release"] = released(server, known, stopped, plan.release_watch())
        merged, latencies = clients.finish()
        after = server.cpu()
        record(result, published, published * plan.subscribers, merged, latencies, before, after)
        result.behind_schedule_s = round(behind, 3)
        result.kept_up = result.lost == 0 and behind < 0.05 * plan.seconds + 0.2
        result.extra.update(watch.stop())
        metrics = socket_metrics(httpx.get(f"{server.url}/metrics", timeout=10).text, DEFENCE_METRICS)
        result.extra["server_metrics"] = metrics
        result.extra["upstream_polls_failed"] = sum(v for k, v in metrics.items() if k.startswith("stream_provider_polls")
                                                    and f'provider="{UPSTREAM}"' in k and 'outcome="ok"' not in k
                                                    and 'outcome="not_modified"' not in k)
        result.extra["server_log"] = log_problems(server.output())
    finally:
        if attacker is not None:
            attacker.proc.kill()
        if server is not None:
            server.stop()
        upstream.close()
        os.unlink(config.name)
    return result


def released(server: RunningServer, known: dict[str, tuple[str, str]], since: float, limit: float) -> dict:
    """Look every 0.25 s until the server holds no connection from an attacker's address and
    ``stream_sockets`` counts no more than the connections it holds from ours: the seconds from
    ``since`` (None if that took over ``limit``), when each group's last socket was last seen
    held, and what was left at ``limit``. ``known`` is ``server.connections()`` from before the
    attacker stopped: a socket reset since then is in no table, and is known by its inode."""
    owners = _owners()
    last_held: dict[str, float] = {}
    first_look = round(time.monotonic() - since, 2)
    with httpx.Client(timeout=2) as client:
        while True:
            elapsed = time.monotonic() - since
            try:
                counted = socket_metrics(client.get(f"{server.url}/metrics").text, ("stream_sockets ",)).get("stream_sockets")
            except httpx.HTTPError:
                counted = None
            theirs: Counter[str] = Counter()
            ours = 0
            for inode, (address, state) in server.connections().items():
                address = known.get(inode, (address, state))[0] if address == "?" else address
                if address in OURS:
                    ours += 1
                    continue
                group = owners.get(address, address)
                theirs[f"{group} {state}"] += 1
                last_held[group] = round(elapsed, 2)
            done = counted is not None and counted <= ours and not theirs
            if done or elapsed > limit:
                return {"seconds": round(elapsed, 2) if done else None, "first_look_s": first_look, "last_held_s": last_held,
                        "left": dict(theirs), "stream_sockets": counted, "ours": ours}
            time.sleep(0.25)


def log_problems(text: str) -> dict:
    """Tracebacks and ERROR lines in a server's output, and its WARNING lines by message."""
    lines = text.splitlines()
    ends = Counter(lines[i] for i in range(1, len(lines)) if lines[i - 1].startswith("  ") and not lines[i].startswith(" ")
                   and any(line.startswith("Traceback") for line in lines[max(0, i - 200) : i]))
    warnings = Counter(line.split(" WARNING ", 1)[1] for line in lines if " WARNING " in line)
    return {"tracebacks": sum(line.startswith("Traceback") for line in lines), "exceptions": dict(ends.most_common(5)),
            "errors": [line for line in lines if " ERROR " in line][:5], "warnings": dict(warnings.most_common(5))}


def verdicts(quiet: Result, under: Result, plan: Defences) -> dict[str, dict]:
    release = under.extra.get("release", {})
    p99_bound = max(2 * quiet.p99_ms, P99_FLOOR_MS)
    peak_mb = under.extra.get("rss_peak_kb", 0) / 1024
    polled, quiet_polled = under.extra.get("upstream_polled", 0), quiet.extra.get("upstream_polled", 0)
    failed = under.extra.get("upstream_polls_failed", 0) + quiet.extra.get("upstream_polls_failed", 0)
    return {
        "p99": {"passed": under.p99_ms <= p99_bound, "value_ms": under.p99_ms, "bound_ms": p99_bound},
        "nothing_lost": {"passed": under.lost == quiet.lost == 0, "lost": under.lost, "quiet_lost": quiet.lost},
        "rss": {"passed": peak_mb < RSS_BOUND_MB, "peak_mb": round(peak_mb, 1), "bound_mb": RSS_BOUND_MB},
        "release": {"passed": release.get("seconds") is not None and release["seconds"] <= plan.release_bound(),
                    "seconds": release.get("seconds"), "bound_s": plan.release_bound()},
        # A poll a second: the window may hold one less however well the pool does.
        "pool": {"passed": failed == 0 and polled >= POLLS_SHARE * quiet_polled - 1, "polled": polled, "quiet_polled": quiet_polled,
                 "failed": failed},
    }


def attack_summary(quiet: Result, under: Result, plan: Defences) -> tuple[dict, list[str]]:
    """The verdicts and the lines that report them."""
    report = under.extra.get("attacker", {})
    groups = report.get("groups", {})
    release = under.extra.get("release", {})
    judged = verdicts(quiet, under, plan)
    metrics = under.extra.get("server_metrics", {})
    reached = {name: REACHED[name](group, metrics) for name, group in groups.items() if name in REACHED}
    keys = ("p50_ms", "p99_ms", "max_ms", "delivered", "lost", "duplicates", "out_of_order")
    summary = {"env": plan.env(), "nofile": plan.nofile(), "sizes": plan.attack(), "verdicts": judged,
               "passed": all(v["passed"] for v in judged.values()), "groups_reached": reached, "release": release,
               "quiet": {k: getattr(quiet, k) for k in keys} | quiet.extra, "attacked": {k: getattr(under, k) for k in keys} | under.extra}
    mb = lambda kb: f"{kb / 1024:,.0f} MB"  # noqa: E731
    lines = [f"\nEvery defence at once: {plan.subscribers} WebSocket subscribers (the canary), {plan.rate:g} msg/s for {plan.seconds:g} s, "
             f"quiet and then under attack (stream alone), both under ulimit -n {plan.nofile()} with "
             + " ".join(f"{k}={v}" for k, v in plan.env().items()),
             "run       delivered  lost  dup  p50 ms  p99 ms  max ms  load  newcomers welcomed  upstream polls  server RSS before / peak / after"]
    for name, run in (("quiet", quiet), ("attacked", under)):
        newcomers = run.extra.get("newcomers", {})
        welcomed = f"{newcomers.get('welcome', 0)}/{sum(newcomers.values())}"
        polls = f"{run.extra.get('upstream_polled', 0)} ({run.extra.get('upstream_polls_failed', 0)} failed)"
        lines.append(f"{name:<9} {run.delivered:<10} {run.lost:<5} {run.duplicates:<4} {run.p50_ms:<7.1f} {run.p99_ms:<7.1f} {run.max_ms:<7.1f} "
                     f"{run.extra.get('load_average_1m', 0):<5.2f} {welcomed:<18} {polls:<15} "
                     f"{mb(run.extra['rss_before_kb'])} / {mb(run.extra['rss_peak_kb'])} / {mb(run.extra['rss_after_kb'])}")
    lines.append(f"  newcomers: a fresh WebSocket from {NEWCOMER} every second (and what it was told if not welcomed: "
                 f"{ {k: v for k, v in under.extra.get('newcomers', {}).items() if k != 'welcome'} }); upstream polls: "
                 "requests the upstream got while the canary was measured; RSS: before the attacker started, its peak, after the release")
    if groups:
        setup = report.get("setup", {})
        lines.append(f"  attacker: setup published {setup.get('statuses', {})} of {setup.get('topics', 0):,} retained ~1 KB topics in "
                     f"{setup.get('seconds', 0)} s; then held {report['held_total_peak']:,} sockets at peak (mean {report['held_total_mean']:g}) "
                     f"for {report['seconds_attacking']} s; the server closed {report['closed_by_server']:,}; attacker CPU {report['cpu_s']} s")
        for name, group in groups.items():
            extra = {k: v for k, v in group.items() if k not in STANDARD}
            let_go = group["let_go_after_s"]
            lines.append(group_line(LABELS.get(name, name), group)
                         + (f"; let go after {let_go['p50']} s (median), {let_go['max']} s (max)" if let_go else "")
                         + ("; " + ", ".join(f"{k} {v:,}" for k, v in extra.items()) if extra else "")
                         + ("" if reached.get(name, True) else "  [did NOT reach its defence]"))
    shown = {k: v for k, v in metrics.items() if v}
    if shown:
        lines.append("  server metrics at the end: " + ", ".join(f"{k} {v:g}" for k, v in shown.items()))
    for name, run in (("quiet", quiet), ("attacked", under)):
        log = run.extra.get("server_log", {})
        lines.append(f"  server log ({name}): {log.get('tracebacks', 0)} tracebacks" + (f" {log['exceptions']}" if log.get("exceptions") else "")
                     + (f", errors {log['errors']}" if log.get("errors") else "") + (f"; warnings {log['warnings']}" if log.get("warnings") else ""))
    last = sorted(release.get("last_held_s", {}).items(), key=lambda item: -item[1])
    lines.append(f"  after the attacker stopped (first look {release.get('first_look_s')} s later: its report came first), the server "
                 "last held a socket of " + (", ".join(f"{LABELS.get(g, g)} at {t} s" for g, t in last) if last else "no group")
                 + ("; every other group's were gone at the first look" if last else "")
                 + (f"; still held {plan.release_watch():g} s after: {release['left']}" if release.get("left") else ""))
    lines.append("  verdicts:")
    p99, rss, pool = judged["p99"], judged["rss"], judged["pool"]
    for key, text in (
        ("p99", f"canary p99 under attack {under.p99_ms:.1f} ms <= max(2 x quiet {quiet.p99_ms:.1f} ms, {P99_FLOOR_MS:g} ms) "
                f"= {p99['bound_ms']:.1f} ms (p50 {quiet.p50_ms:.1f} -> {under.p50_ms:.1f} ms, max {quiet.max_ms:.1f} -> {under.max_ms:.1f} ms)"),
        ("nothing_lost", f"nothing lost: {under.lost} of {under.expected:,} under attack, {quiet.lost} of {quiet.expected:,} quiet"),
        ("rss", f"server RSS peak {rss['peak_mb']:,.0f} MB < {RSS_BOUND_MB} MiB"),
        ("release", "every attacker socket released "
                    + (f"{release['seconds']} s" if release.get("seconds") is not None else f"NOT within {plan.release_watch():g} s")
                    + f" after the attacker stopped (bound: write_stall_timeout {plan.write_stall:g} + 5 = {plan.release_bound():g} s)"),
        ("pool", f"the pool still works: {pool['polled']} polls under attack >= {POLLS_SHARE:.0%} of {pool['quiet_polled']} quiet, "
                 f"{pool['failed']} failed"),
    ):
        lines.append(f"    {'PASS' if judged[key]['passed'] else 'FAIL'}  {text}")
    if not all(reached.values()):
        lines.append(f"  NOTE: groups that did not reach their defence: {[k for k, v in reached.items() if not v]}")
    return summary, lines


# -- the fdchurn scenario -----------------------------------------------------------------


def fd_churn(plan: FdChurn) -> tuple[dict, list[str]]:
    """(18): ``plan.sockets`` idle sockets from 12 addresses, each reopened as soon as the server
    closes it, against stream under ``ulimit -n plan.nofile``, while a fresh /healthz from
    127.0.0.1 goes every ``plan.every`` s; the share answered 200 within ``plan.timeout`` s."""
    server = RunningServer(STREAM, nofile=plan.nofile)
    attacker = None
    try:
        attacker = Attacker(server, {**NO_HOSTILE, "topics": 0, "fd_churn": plan.sockets}, duration=plan.seconds + 30)
        ready = attacker.wait_ready()
        watch = RssWatch(server)
        time.sleep(1.0)
        probe = Probe(lambda: http_status(server.url, "/healthz", "127.0.0.1", plan.timeout), plan.every, plan.seconds)
        probe.thread.join(plan.seconds + 2 * plan.timeout)
        answers = probe.stop()
        report = attacker.stop()
        attacker = None
        rss = watch.stop()
        metrics = socket_metrics(httpx.get(f"{server.url}/metrics", timeout=10).text, DEFENCE_METRICS)
        log = log_problems(server.output())
    finally:
        if attacker is not None:
            attacker.proc.kill()
        server.stop()
    tried, answered = sum(answers.values()), answers.get("200", 0)
    ratio = answered / max(1, tried)
    summary = {**asdict(plan), "tried": tried, "answered": answered, "ratio": round(ratio, 3), "answers": dict(answers),
               "passed": ratio >= HEALTHZ_TARGET, "attacker_ready": ready, "attacker": report, "server_metrics": metrics, "server_log": log,
               **rss}
    group = report["groups"]["fd_churn"]
    lines = [f"\nfd churn: stream under ulimit -n {plan.nofile}; {plan.sockets:,} idle sockets, each reopened as soon as the server "
             f"closes it, for {plan.seconds:g} s",
             f"  /healthz from 127.0.0.1 every {plan.every:g} s, a fresh connection each: {answered}/{tried} answered 200 within "
             f"{plan.timeout:g} s ({ratio:.1%}); answers {dict(answers)}",
             group_line(LABELS["fd_churn"], group) + f"; attacker CPU {report['cpu_s']} s",
             f"  server RSS {rss['rss_before_kb'] / 1024:,.0f} MB before the probing, {rss['rss_peak_kb'] / 1024:,.0f} MB at its peak",
             "  server metrics at the end: " + ", ".join(f"{k} {v:g}" for k, v in metrics.items() if v),
             f"  server log: {log['tracebacks']} tracebacks" + (f" {log['exceptions']}" if log["exceptions"] else "")
             + (f", errors {log['errors']}" if log["errors"] else "") + (f"; warnings {log['warnings']}" if log["warnings"] else ""),
             f"  verdict: {'PASS' if summary['passed'] else 'FAIL'} (needs at least {HEALTHZ_TARGET:.0%} of /healthz answered)"]
    return summary, lines
