"""`migrate run`, `migrate status`, `migrate cancel`: the operator's side.

`run` asks the source host's agent to start the migration (the agent
coordinates it: it goes on if this command goes away), then follows it,
showing the phase, round, dirty rate, bytes left and predicted downtime,
and ends with a summary.  Exit status 0 when the process runs on the
destination, 1 when the migration failed (the process still runs on the
source), 2 for bad input.
"""

from __future__ import annotations

import asyncio
import json
import sys

import aiohttp

from migrate import errors
from migrate.orchestrator import inventory as inv

POLL_S = 0.1


class AgentError(errors.MigrateError):
    """An agent could not be reached or refused the request."""


class Client:
    def __init__(self, inventory: inv.Inventory) -> None:
        self.inv = inventory
        self.ssl = inventory.tls.client_context() if inventory.tls else None

    async def __aenter__(self) -> "Client":
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    async def call(self, host: str, method: str, path: str, body=None,
                   timeout: float = 30) -> dict:
        h = self.inv.host(host)
        url = h.agent + path
        try:
            async with self.session.request(
                    method, url, json=body, ssl=self.ssl if url.startswith("https:") else None,
                    timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                try:
                    data = await r.json(content_type=None)
                except ValueError:
                    data = {"error": (await r.text())[:200]}
                if r.status >= 400:
                    raise AgentError(f"agent {host}: {data.get('error') or r.reason}")
                return data
        except asyncio.TimeoutError:
            raise AgentError(f"agent {host} ({url}): no answer in {timeout:.0f} s") from None
        except aiohttp.ClientError as e:
            raise AgentError(f"agent {host} ({url}): {e}") from None


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _ms(s) -> str:
    return "-" if s is None else f"{s * 1e3:.0f} ms"


def _rate(r) -> str:
    return "-" if r is None else f"{r / 2**20:.0f} MiB/s"


def summary(m: dict) -> str:
    lines = [f"migration {m['id']}: pid {m['pid']} {m['src']} -> {m['dst']}: {m['status']}"]
    if m.get("error"):
        lines.append(f"  error in {m['error']['phase']}: {m['error']['message']}")
        if m["status"] != "completed":
            lines.append(f"  the process still runs on {m['src']}")
    lines.append(f"  total time {m['total_time']:.2f} s, setup {_ms(m.get('setup_time'))}, "
                 f"downtime {_ms(m.get('downtime'))} (expected "
                 f"{_ms(m.get('expected_downtime'))})")
    total = m.get("bytes_total") or 0
    sent = m.get("bytes_transferred") or 0
    lines.append(f"  process {_mib(total)}, sent {_mib(sent)}"
                 + (f" ({sent / total:.2f}x)" if total else "")
                 + f", {len(m.get('rounds', []))} pre-copy rounds, throughput "
                 f"{_rate(m.get('throughput'))}")
    for r in m.get("rounds", []):
        lines.append(f"    round {r['round']}: {r['pages']} pages, {_mib(r['bytes'])} in "
                     f"{r['seconds']:.2f} s")
    if m.get("stop"):
        s = m["stop"]
        lines.append(f"  stop: {s.get('pages', 0)} pages, {_mib(s.get('bytes'))}; dump "
                     f"{_ms(s.get('frozen_for_dump'))}, address "
                     f"{_ms(s.get('address_seconds'))}, restore "
                     f"{_ms(s.get('build_seconds'))}, resume {_ms(s.get('resume_seconds'))}")
    if m.get("decision"):
        lines.append(f"  pre-copy ended: {m['decision']}")
    if m.get("restored_pid"):
        lines.append(f"  now pid {m['restored_pid']} on {m['dst']}")
    return "\n".join(lines)


async def _follow(c: Client, host: str, mid: str, live: bool, plain: bool = False) -> dict:
    """Poll the record until it ends: a live table on a terminal (``live``),
    else a line per phase and round (``plain``), else quietly."""
    progress = None
    if live:
        from rich.console import Console
        from rich.live import Live
        from rich.table import Table
        console = Console(stderr=True)

        def render(m: dict):
            t = Table.grid(padding=(0, 2))
            t.add_row("phase", f"[bold]{m['phase']}[/bold] ({m['status']})")
            rounds = m.get("rounds") or []
            t.add_row("round", str(len(rounds)))
            t.add_row("dirty rate", _rate(m.get("dirty_rate")))
            t.add_row("sent / left", f"{_mib(m.get('bytes_transferred'))} / "
                                     f"{_mib(m.get('bytes_remaining'))}")
            t.add_row("throughput", _rate(m.get("throughput")))
            t.add_row("predicted downtime", _ms(m.get("expected_downtime")))
            if m.get("downtime") is not None:
                t.add_row("downtime", _ms(m["downtime"]))
            return t
        progress = Live(console=console, refresh_per_second=10, transient=False)
        progress.start()
    seen = (None, 0)
    try:
        while True:
            m = await c.call(host, "GET", f"/api/v1/migrations/{mid}")
            if progress is not None:
                progress.update(render(m))
            elif plain:
                now = (m["phase"], len(m.get("rounds") or []))
                if now != seen:
                    seen = now
                    rounds = m.get("rounds") or []
                    extra = ""
                    if m["phase"] == "pre-copy" and rounds:
                        r = rounds[-1]
                        extra = (f": round {r['round']}, {_mib(r['bytes'])} in "
                                 f"{r['seconds']:.2f} s, dirty rate "
                                 f"{_rate(m.get('dirty_rate'))}, predicted downtime "
                                 f"{_ms(m.get('expected_downtime'))}")
                    print(f"  {m['phase']}{extra}", file=sys.stderr, flush=True)
            if m["status"] != "active":
                return m
            await asyncio.sleep(POLL_S)
    finally:
        if progress is not None:
            progress.stop()


async def run(args) -> int:
    inventory = inv.load_inventory(args.inventory)
    inventory.host(args.src)
    inventory.host(args.dst)
    opts = {"downtime_limit": args.downtime_limit / 1000.0, "max_rounds": args.max_rounds,
            "max_bandwidth": args.max_bandwidth, "auto_converge": args.auto_converge,
            "post_copy": args.post_copy, "pre_copy": not args.no_pre_copy,
            "tcp_established": args.tcp_established, "move_address": args.move_address,
            "keep_images": args.keep_images, "restore_fill": args.restore_fill}
    async with Client(inventory) as c:
        m = await c.call(args.src, "POST", "/api/v1/migrations",
                         {"pid": args.pid, "dst": args.dst, "options": opts})
        if args.detach:
            print(m["id"])
            return 0
        live = sys.stderr.isatty() and not args.json
        try:
            m = await _follow(c, args.src, m["id"], live, plain=not args.json)
        except KeyboardInterrupt:
            print(f"migration {m['id']} goes on (agent {args.src}); `migrate status "
                  f"{m['id']}` follows it, `migrate cancel {m['id']}` stops it",
                  file=sys.stderr)
            return 130
    print(json.dumps(m, indent=2) if args.json else summary(m))
    return 0 if m["status"] == "completed" else 1


async def status(args) -> int:
    inventory = inv.load_inventory(args.inventory)
    hosts = [args.host] if args.host else sorted(inventory.hosts)
    out = []
    async with Client(inventory) as c:
        for h in hosts:
            try:
                if args.id:
                    try:
                        out.append(await c.call(h, "GET", f"/api/v1/migrations/{args.id}"))
                    except AgentError as e:
                        if "no migration" not in str(e):
                            raise
                else:
                    out.extend((await c.call(h, "GET", "/api/v1/migrations"))["migrations"])
            except AgentError as e:
                print(f"migrate status: {e}", file=sys.stderr)
    if args.id and not out:
        print(f"migrate status: no agent knows migration {args.id}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for m in out:
            if m["role"] == "source" or args.id:
                print(summary(m) if m["status"] != "active" else
                      f"migration {m['id']}: pid {m['pid']} {m['src']} -> {m['dst']}: "
                      f"{m['phase']} ({m['role']} {m['src'] if m['role'] == 'source' else m['dst']})")
    return 0


async def cancel(args) -> int:
    inventory = inv.load_inventory(args.inventory)
    async with Client(inventory) as c:
        for h in ([args.host] if args.host else sorted(inventory.hosts)):
            try:
                m = await c.call(h, "GET", f"/api/v1/migrations/{args.id}")
            except AgentError:
                continue
            if m["role"] != "source":
                continue
            await c.call(h, "POST", f"/api/v1/migrations/{args.id}/cancel", {})
            m = await _follow(c, h, args.id, False)
            print(summary(m))
            return 0 if m["status"] == "cancelled" else 1
    print(f"migrate cancel: no agent coordinates migration {args.id}", file=sys.stderr)
    return 1


def main(fn, args) -> int:
    try:
        return asyncio.run(fn(args))
    except inv.ConfigError as e:
        print(f"migrate {args.command}: {e}", file=sys.stderr)
        return 2
    except AgentError as e:
        print(f"migrate {args.command}: {e}", file=sys.stderr)
        return 1

