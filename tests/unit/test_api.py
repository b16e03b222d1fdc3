"""The operators' view (orchestrator/api.py): the OpenAPI document against
the routes the agent serves, the record against its schema, request
validation, the metrics as Prometheus parses them, the event stream."""

import asyncio
import json
import types

import jsonschema
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from migrate.orchestrator import agent as agent_mod
from migrate.orchestrator import api
from migrate.orchestrator import migration as mig


class FakeAgent:
    def __init__(self, token=None):
        self.name = "T"
        self.migrations = {}
        self.listeners = set()
        self.cfg = types.SimpleNamespace(status_token=token)
        self.pageserver = types.SimpleNamespace(port=27027)

    def register(self, m):
        m.listeners = self.listeners
        self.migrations[m.id] = m
        m.event("created", role=m.role)


def control_app(agent):
    # as Agent.start builds it
    app = web.Application(client_max_size=agent_mod.MAX_BODY,
                          middlewares=[agent_mod._errors_as_json])
    app["agent"] = agent
    app.add_routes(agent_mod.ROUTES)
    api.add_routes(app)
    return app


def routes_of(app):
    out = set()
    for r in app.router.routes():
        if r.method != "HEAD":
            out.add((r.resource.canonical, r.method.lower()))
    return out


def documented(listener=None):
    return {(p, m) for p, ops in api.OPENAPI["paths"].items() for m, op in ops.items()
            if listener is None or listener in op["x-listeners"]}


def test_openapi_describes_every_route_and_nothing_else():
    assert routes_of(control_app(FakeAgent())) == documented()
    assert routes_of(api.status_app(FakeAgent())) == documented(api.STATUS)
    # the status listener is read-only
    assert {m for _, m in documented(api.STATUS)} == {"get"}
    for p, m in documented(api.CONTROL) - documented(api.STATUS):
        assert m == "post", p


def test_openapi_is_a_valid_document():
    from jsonschema import Draft202012Validator
    for name, s in api.OPENAPI["components"]["schemas"].items():
        Draft202012Validator.check_schema(s)
    json.dumps(api.OPENAPI)
    for p, ops in api.OPENAPI["paths"].items():
        for m, op in ops.items():
            assert op["responses"] and op["summary"], (p, m)
            for par in op.get("parameters", []):
                if par["in"] == "path":
                    assert "{" + par["name"] + "}" in p


def _schema(name):
    s = dict(api.OPENAPI["components"]["schemas"][name])
    s["$defs"] = {}
    return {**s, "components": api.OPENAPI["components"]}


def validate_record(rec):
    doc = {"$ref": "#/components/schemas/Migration", "components": api.OPENAPI["components"]}
    jsonschema.validate(rec, doc, cls=jsonschema.Draft202012Validator)
    api.check(rec, api.MIGRATION)


def a_migration(role="source"):
    m = mig.Migration(role, 1234, "A", "B", mig.Options())
    m.bytes_total = 64 << 20
    for p in ("prepare", "pre-copy"):
        m.set_phase(p)
    m.rounds.append(mig.Round(1, 1000, 4096000, 0.5, 1000))
    m.bytes_transferred = 4096000
    m.dirty_rate = 8192000.0
    m.set_phase("stop")
    m.stop_stats = {"pages": 10, "bytes": 40960, "dump_seconds": 0.05}
    m.set_phase("restore")
    m.downtime = 0.12
    m.set_phase("resume")
    if role == "destination":
        m.fill = {"mode": "lazy", "done": True, "pages_fault": 7, "pages_prefetch": 9000,
                  "faults": 7, "blocktime_total_us": 3500.0, "fault_latency_p50_us": 400.0,
                  "fault_latency_p99_us": 900.0,
                  "fault_latency_buckets_us": [[250, 2], [500, 5], [1000, 7]]}
    m.set_phase("cleanup")
    m.finish(mig.COMPLETED)
    return m


def test_record_matches_its_schema_through_a_migration():
    m = mig.Migration("source", 1234, "A", "B", mig.Options())
    validate_record(m.as_dict())
    m = a_migration()
    rec = m.as_dict()
    validate_record(rec)
    assert [p["phase"] for p in rec["phases"]] == ["prepare", "pre-copy", "stop", "restore",
                                                   "resume", "cleanup"]
    assert all(p["duration"] is not None and p["duration"] >= 0 for p in rec["phases"])
    assert rec["precopy_bytes"] == 4096000 and rec["downtime_bytes"] == 40960
    assert rec["dirty_pages_rate"] == 2000.0
    d = a_migration("destination").as_dict()
    validate_record(d)
    assert (d["postcopy_faults"], d["postcopy_prefetched"]) == (7, 9000)
    assert d["postcopy_blocktime"] == pytest.approx(0.0035)
    m = mig.Migration("source", 1234, "A", "B", mig.Options())
    m.finish(mig.FAILED, mig.MigrationFailed("prepare", "no process 1234 on A"))
    rec = m.as_dict()
    validate_record(rec)
    assert rec["error"] == {"phase": "prepare", "message": "no process 1234 on A"}


@pytest.mark.parametrize("body,why", [
    ({"pid": 5}, "dst is missing"),
    ({"pid": 5, "dst": "B", "colour": 1}, "unknown field 'colour'"),
    ({"pid": "5", "dst": "B"}, "pid must be integer"),
    ({"pid": True, "dst": "B"}, "pid must be integer"),
    ({"pid": 1, "dst": "B"}, "pid must be at least 2"),
    ({"pid": 5, "dst": "B", "options": {"max_rounds": -1}}, "options.max_rounds must be at "
                                                            "least 0"),
    ({"pid": 5, "dst": "B", "options": {"speed": 1}}, "options: unknown field 'speed'"),
    ({"pid": 5, "dst": "B", "options": []}, "options must be object"),
])
def test_start_request_checks_say_what(body, why):
    with pytest.raises(api.Invalid, match=why):
        api.check(body, api.START)


def test_incoming_requirements_refuse_odd_paths():
    req = {"id": "abc", "requirements": {"pids": [5], "files": ["/x\x00y"]}}
    with pytest.raises(api.Invalid, match=r"requirements.files\[0\]"):
        api.check(req, api.INCOMING)
    api.check({"id": "abc", "requirements": {"pids": [5], "files": ["/bin/sh"]}},
              api.INCOMING)


def test_metrics_parse_and_count():
    a = FakeAgent()
    for role in ("source", "destination"):
        m = a_migration(role)
        a.migrations[m.id] = m
    failed = mig.Migration("source", 99, "A", "B", mig.Options())
    failed.finish(mig.FAILED, mig.MigrationFailed("prepare", "x"))
    a.migrations[failed.id] = failed
    running = mig.Migration("source", 98, "A", "B", mig.Options())
    a.migrations[running.id] = running
    from prometheus_client import REGISTRY, generate_latest
    text = generate_latest(api.registry(a)).decode()
    assert "migrate_" not in generate_latest(REGISTRY).decode()   # not the global one
    fams = {f.name: f for f in text_string_to_metric_families(text)}

    def value(fam, sample=None, **labels):
        for s in fams[fam].samples:
            if (sample is None or s.name == sample) and all(
                    s.labels.get(k) == v for k, v in labels.items()):
                return s.value
        raise AssertionError((fam, sample, labels))
    assert fams["migrate_migrations"].type == "counter"
    assert value("migrate_migrations", role="source", status="completed") == 1
    assert value("migrate_migrations", role="source", status="failed") == 1
    assert value("migrate_migrations", role="destination", status="completed") == 1
    assert value("migrate_active_migrations", role="source") == 1
    assert value("migrate_bytes_transferred", "migrate_bytes_transferred_total") == 4096000
    assert value("migrate_precopy_rounds", "migrate_precopy_rounds_total") == 1
    assert fams["migrate_downtime_seconds"].type == "histogram"
    assert value("migrate_downtime_seconds", "migrate_downtime_seconds_count") == 1
    assert value("migrate_downtime_seconds", "migrate_downtime_seconds_bucket",
                 le="0.1") == 0
    assert value("migrate_downtime_seconds", "migrate_downtime_seconds_bucket",
                 le="0.25") == 1
    assert fams["migrate_fault_latency_seconds"].type == "histogram"
    assert value("migrate_fault_latency_seconds", "migrate_fault_latency_seconds_bucket",
                 le="0.0005") == 5
    assert value("migrate_fault_latency_seconds", "migrate_fault_latency_seconds_count") == 7
    assert value("migrate_fault_latency_seconds", "migrate_fault_latency_seconds_sum") == \
        pytest.approx(0.0035)
    assert value("migrate_postcopy_pages", kind="prefetch") == 9000


def test_event_stream_filters_and_carries_the_record():
    async def go():
        a = FakeAgent()
        client = TestClient(TestServer(control_app(a)))
        await client.start_server()
        try:
            other = mig.Migration("source", 77, "A", "B", mig.Options())
            a.register(other)
            m = mig.Migration("source", 1234, "A", "B", mig.Options())
            a.register(m)
            r = await client.get(f"/api/v1/events?migration={m.id}")
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            got = []

            async def read():
                kind = None
                async for line in r.content:
                    line = line.decode().rstrip("\n")
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: "):
                        got.append((kind, json.loads(line[6:])))
                        if kind == "status":
                            return
            reader = asyncio.ensure_future(read())
            await asyncio.sleep(0.1)
            other.set_phase("prepare")
            m.set_phase("prepare")
            m.set_phase("pre-copy")
            m.finish(mig.COMPLETED)
            await asyncio.wait_for(reader, 5)
            assert got[0][0] == "snapshot" and got[0][1]["id"] == m.id
            assert all(d["id"] == m.id for _, d in got)
            kinds = [k for k, _ in got]
            assert [d["phase"] for k, d in got if k == "phase"] == ["prepare", "pre-copy"]
            assert kinds[-1] == "status" and got[-1][1]["record"]["status"] == "completed"
            r.close()
            bad = await client.get("/api/v1/events?migration=../x")
            assert bad.status == 400 and "migration" in (await bad.json())["error"]
        finally:
            await client.close()
    asyncio.run(go())


def test_status_listener_needs_the_token_and_refuses_post():
    async def go():
        a = FakeAgent(token="s3cret")
        client = TestClient(TestServer(api.status_app(a)))
        await client.start_server()
        try:
            r = await client.get("/api/v1/migrations")
            assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
            r = await client.get("/api/v1/migrations",
                                 headers={"Authorization": "Bearer wrong"})
            assert r.status == 401
            ok = {"Authorization": "Bearer s3cret"}
            r = await client.get("/api/v1/migrations", headers=ok)
            assert r.status == 200 and await r.json() == {"migrations": []}
            r = await client.get("/metrics?access_token=s3cret")
            assert r.status == 200
            # the dashboard's files hold no data: no token needed
            r = await client.get("/")
            assert r.status == 200 and "<html" in (await r.text()).lower()
            r = await client.get("/dashboard/app.js")
            assert r.status == 200 and "EventSource" in await r.text()
            r = await client.get("/api/v1/openapi.json")
            assert r.status == 401
            for path in ("/api/v1/migrations", "/api/v1/migrations/abc/cancel",
                         "/api/v1/incoming"):
                r = await client.post(path, json={"pid": 5, "dst": "B"}, headers=ok)
                assert r.status in (404, 405), (path, r.status)
                assert "error" in await r.json()
        finally:
            await client.close()
    asyncio.run(go())


def test_control_inputs_are_4xx_with_a_message(tmp_path):
    from migrate.orchestrator import inventory as inv
    hosts = tmp_path / "hosts.toml"
    hosts.write_text('[hosts.B]\nagent = "http://127.0.0.1:1"\naddress = "127.0.0.1"\n')
    cfg = inv.AgentConfig(path=str(tmp_path / "agent.toml"), name="A", address="127.0.0.1",
                          port=1, page_server_port=2, work_dir=str(tmp_path / "work"),
                          tls=None, inventory=str(hosts))

    async def go():
        a = agent_mod.Agent(cfg)
        client = TestClient(TestServer(control_app(a)))
        await client.start_server()
        try:
            async def post(path, **kw):
                r = await client.post(path, **kw)
                body = await r.json()
                assert set(body) == {"error"} and body["error"], body
                return r.status, body["error"]
            st, msg = await post("/api/v1/migrations", json={"pid": 5, "dst": "Z"})
            assert st == 400 and "unknown host 'Z'" in msg
            st, msg = await post("/api/v1/migrations", json={"pid": 2**22 + 5, "dst": "B"})
            assert st == 404 and "no process" in msg
            st, msg = await post("/api/v1/migrations", json={"pid": 5, "dst": "A"})
            assert st == 400 and "this host" in msg
            st, msg = await post("/api/v1/migrations", data=b"{not json")
            assert st == 400 and "not JSON" in msg
            st, msg = await post("/api/v1/migrations", data=b"[1, 2]")
            assert st == 400 and "object" in msg
            st, msg = await post("/api/v1/migrations", data=b"x" * (agent_mod.MAX_BODY + 10))
            assert st == 413
            st, msg = await post("/api/v1/migrations/abc%0d%0a/cancel")
            assert st == 400 and "id must match" in msg
            st, msg = await post("/api/v1/migrations/abc/cancel")
            assert st == 404 and "no migration abc" in msg
            st, msg = await post("/api/v1/incoming/abc/explode", json={})
            assert st == 400 and "action must be one of" in msg
            st, msg = await post("/api/v1/incoming", json={"id": "a/b", "requirements": {}})
            assert st == 400 and "id must match" in msg
        finally:
            await client.close()
            await a.pool.close()
    asyncio.run(go())


def test_event_stream_keeps_alive(monkeypatch):
    monkeypatch.setattr(api, "KEEPALIVE_S", 0.2)

    async def go():
        client = TestClient(TestServer(control_app(FakeAgent())))
        await client.start_server()
        try:
            r = await client.get("/api/v1/events")
            seen = b""
            while b": keep-alive" not in seen:
                seen += await asyncio.wait_for(r.content.readany(), 2)
            r.close()
        finally:
            await client.close()
    asyncio.run(go())
