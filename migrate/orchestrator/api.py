"""The operators' view of an agent (DESIGN.md §5, issue 10): the OpenAPI
document of the status API, the event stream, Prometheus metrics, the
dashboard, request validation, and the read-only listener.

Two listeners serve it:

- the control listener (agent.py: ``address:port``, mutual TLS when the
  config has ``[tls]``): everything, including start, cancel and the
  agent-to-agent ``/api/v1/incoming/...``;
- the status listener (``status_address:status_port``, plaintext, 127.0.0.1:7444
  by default, ``status_port = 0`` turns it off): the read-only endpoints
  only (``x-listeners`` in the document says which), behind a bearer token
  when ``status_token`` is set (``Authorization: Bearer TOKEN``, or
  ``?access_token=TOKEN`` as RFC 6750 §2.3 allows, for EventSource, which
  cannot set headers).

Request bodies are checked against the document (``_validate``) before a
handler sees them: a wrong type, a missing or unknown field is a 400 with a
message naming the field.  The metrics are computed from the migration
records at each scrape (``RecordCollector``), in a registry of this agent's
own; the agent keeps every record while it runs, so the counters only grow.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import time
import weakref

from aiohttp import web

from migrate import __version__
from migrate.orchestrator import migration as mig

log = logging.getLogger(__name__)

KEEPALIVE_S = 15.0          # an SSE comment when nothing else was sent for this long
PROGRESS_S = 1.0            # a "progress" event per active migration this often
QUEUE_MAX = 1000            # events a slow client may lag behind before it loses some
DASHBOARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard")
DASHBOARD_FILES = ("index.html", "app.js", "style.css")
ID_PATTERN = "^[A-Za-z0-9]{1,64}$"
INCOMING_ACTIONS = ("restore", "address", "round", "resume", "alive", "source", "abort",
                    "finish")
DOWNTIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DURATION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

CONTROL, STATUS = "control", "status"
CLOSING = web.AppKey("closing", asyncio.Event)   # set when the app shuts down

# --------------------------------------------------------------------------
# the OpenAPI document

def _null(schema: dict) -> dict:
    s = dict(schema)
    s["type"] = [s["type"], "null"]
    return s


_NUM = {"type": "number"}
_INT = {"type": "integer"}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_NNUM = _null(_NUM)
_NINT = _null(_INT)


def _obj(props: dict, required=(), extra=False) -> dict:
    return {"type": "object", "properties": props, "required": list(required),
            "additionalProperties": extra}


OPTIONS = _obj({
    "downtime_limit": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600,
                       "description": "seconds; pre-copy ends when the predicted downtime "
                                      "is under it"},
    "max_rounds": {"type": "integer", "minimum": 0, "maximum": 1000},
    "max_bandwidth": {"type": ["integer", "null"], "minimum": 1,
                      "description": "bytes/s"},
    "auto_converge": _BOOL,
    "post_copy": {"type": "string", "enum": ["off", "on", "auto"],
                  "description": "only off is implemented"},
    "pre_copy": _BOOL,
    "tcp_established": _BOOL,
    "move_address": {"type": ["string", "null"], "maxLength": 64,
                     "description": "an IP address"},
    "keep_images": _BOOL,
    "network_lock": {"type": ["string", "null"], "enum": ["nftables", "iptables", "skip",
                                                          None]},
    "streams": {"type": "integer", "minimum": 1, "maximum": 8},
    "compress": _BOOL,
    "restore_fill": {"type": "string", "enum": ["auto", "lazy", "eager"]},
})

ROUND = _obj({"round": _INT, "pages": _INT, "bytes": _INT, "seconds": _NUM,
              "dirty_pages": _INT},
             required=("round", "pages", "bytes", "seconds", "dirty_pages"))

PHASE = _obj({"phase": {"type": "string", "enum": list(mig.PHASES)},
              "start": {"type": "number", "description": "epoch seconds"},
              "duration": {"type": ["number", "null"],
                           "description": "seconds; null while in it"}},
             required=("phase", "start", "duration"))

ERROR_FIELD = {"type": ["object", "null"], "properties": {"phase": _STR, "message": _STR},
               "required": ["phase", "message"], "additionalProperties": False}

STATUSES = [mig.ACTIVE, mig.COMPLETED, mig.FAILED, mig.CANCELLED]

MIGRATION_PROPS = {
    "id": _STR,
    "role": {"type": "string", "enum": ["source", "destination"]},
    "pid": {"type": "integer", "description": "the tree's root, as the source sees it"},
    "src": _STR, "dst": _STR,
    "status": {"type": "string", "enum": STATUSES},
    "phase": {"type": "string", "enum": list(mig.PHASES)},
    "started": {"type": "number", "description": "epoch seconds"},
    "ended": _NNUM,
    "setup_time": {"type": ["number", "null"], "description": "s until pre-copy began"},
    "total_time": {"type": "number", "description": "s so far, or until it ended"},
    "downtime": {"type": ["number", "null"],
                 "description": "measured: s from the freeze to the destination's answer"},
    "expected_downtime": {"type": ["number", "null"],
                          "description": "the convergence policy's last prediction, s"},
    "bytes_total": {"type": "integer", "description": "the tree's RSS"},
    "bytes_transferred": _INT,
    "bytes_remaining": _NINT,
    "dirty_rate": {"type": ["number", "null"], "description": "bytes/s"},
    "dirty_pages_rate": {"type": ["number", "null"], "description": "pages/s"},
    "throughput": {"type": ["number", "null"], "description": "bytes/s"},
    "throttle": {"type": ["integer", "null"], "description": "percent of CPU taken"},
    "throttle_max": {"type": ["integer", "null"],
                     "description": "the most auto-converge took (percent of CPU)"},
    "rounds": {"type": "array", "items": ROUND},
    "decision": {"type": ["string", "null"], "description": "why pre-copy ended"},
    "error": ERROR_FIELD,
    "restored_pid": _NINT,
    "stop": {"type": "object", "additionalProperties": {"type": "number"},
             "description": "the last dump's and the restore's figures"},
    "fill": {"type": ["object", "null"], "additionalProperties": True,
             "description": "destination: the background fill (mode, done, pages_fault, "
                            "pages_prefetch, blocktime_total_us, fault_latency_p50_us, ...)"},
    "options": OPTIONS,
    "phases": {"type": "array", "items": PHASE},
    "precopy_bytes": _INT,
    "downtime_bytes": {"type": ["integer", "null"], "description": "sent while frozen"},
    "postcopy_bytes": {"type": ["integer", "null"],
                       "description": "source: sent after the resume (post-copy)"},
    "postcopy_faults": {"type": ["integer", "null"],
                        "description": "pages the lazy-pages daemon served on a fault"},
    "postcopy_prefetched": {"type": ["integer", "null"],
                            "description": "pages it filled in the background"},
    "postcopy_blocktime": {"type": ["number", "null"],
                           "description": "s the process waited on faults"},
}
MIGRATION = _obj(MIGRATION_PROPS, required=tuple(MIGRATION_PROPS))

# A destination agent that restarted since knows only this of one it resumed.
RESTARTED = _obj({"id": _STR, "role": {"type": "string", "enum": ["destination"]},
                  "status": {"type": "string", "enum": ["completed"]},
                  "phase": {"type": "string", "enum": ["resume"]},
                  "restored_pid": _INT, "error": {"type": "null"}, "note": _STR},
                 required=("id", "role", "status", "phase", "restored_pid", "error", "note"))

ERROR = _obj({"error": _STR}, required=("error",))

EVENT = _obj({"type": _STR, "id": _STR, "time": _NUM,
              "record": {"$ref": "#/components/schemas/Migration"}},
             required=("type", "id", "time"), extra=True)

START = _obj({"pid": {"type": "integer", "minimum": 2, "maximum": 2**31 - 1},
              "dst": {"type": "string", "minLength": 1, "maxLength": 64},
              "options": OPTIONS}, required=("pid", "dst"))

_PATH_STR = {"type": "string", "pattern": "^/[^\\x00]*$", "maxLength": 4096}
REQUIREMENTS = _obj({
    "pid": _INT,
    "pids": {"type": "array", "items": {"type": "integer", "minimum": 1,
                                        "maximum": 2**22}, "maxItems": 100000},
    "threads": {"type": "integer", "minimum": 0},
    "files": {"type": "array", "items": _PATH_STR, "maxItems": 100000},
    "rss": {"type": "integer", "minimum": 0, "maximum": 2**62},
    "cpu_flags": {"type": "array", "items": {"type": "string", "maxLength": 64}},
}, required=("pids",))

INCOMING = _obj({"id": {"type": "string", "pattern": ID_PATTERN},
                 "src": {"type": "string", "maxLength": 64},
                 "pid": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
                 "requirements": REQUIREMENTS, "options": OPTIONS},
                required=("id", "requirements"))

_SESSION = {"type": "string", "maxLength": 200,
            "description": "ID/NAME: an image of this migration at the page-server"}
INCOMING_ACTION = _obj({
    "session": _SESSION,
    "address": {"type": ["string", "null"], "maxLength": 64},
    "action": {"type": "string", "enum": ["add", "del"]},
    "ip": {"type": "string", "maxLength": 64},
    "lock_session": _null(_SESSION),
    "reason": {"type": ["string", "null"], "maxLength": 4096},
    "keep_images": _BOOL,
    "port": {"type": "integer", "minimum": 1, "maximum": 65535},   # source
    "post_copy": _null(_obj({
        "address": {"type": "string", "maxLength": 64},
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "session": _SESSION}, required=("address", "port", "session"))),
})


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


_ERRORS = {"400": _json(_ref("Error"), "bad input: the message says what"),
           "401": _json(_ref("Error"), "status listener: the bearer token is missing or "
                                       "wrong"),
           "404": _json(_ref("Error"), "no such migration"),
           "409": _json(_ref("Error"), "not in a state that allows it"),
           "413": _json(_ref("Error"), "the body is over 1 MiB")}


def _op(summary: str, listeners, responses: dict, body: dict | None = None,
        params=(), errors=("400",)) -> dict:
    op = {"summary": summary, "x-listeners": list(listeners),
          "responses": {**responses, **{k: _ERRORS[k] for k in errors}}}
    if params:
        op["parameters"] = list(params)
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json":
                                                           {"schema": body}}}
    return op


_BOTH = (CONTROL, STATUS)
_ID = {"name": "id", "in": "path", "required": True,
       "schema": {"type": "string", "pattern": ID_PATTERN}}
_RO_ERRORS = ("401",)

OPENAPI: dict = {
    "openapi": "3.1.0",
    "info": {"title": "migrate agent", "version": __version__,
             "description": "Every agent serves the migrations it takes part in. Control "
                            "operations (x-listeners: control) are served on the "
                            "mutual-TLS listener only; read-only ones on the status "
                            "listener too (plaintext, localhost by default, optional "
                            "bearer token)."},
    "paths": {
        "/api/v1/health": {"get": _op(
            "this agent", _BOTH, {"200": _json(_obj(
                {"host": _STR, "version": _STR, "pid": _INT, "page_server_port": _INT},
                required=("host", "version", "pid", "page_server_port")), "alive")},
            errors=_RO_ERRORS)},
        "/api/v1/migrations": {
            "get": _op("every migration this agent takes part in", _BOTH, {
                "200": _json(_obj({"migrations": {"type": "array",
                                                  "items": _ref("Migration")}},
                                  required=("migrations",)), "the records")},
                errors=_RO_ERRORS),
            "post": _op("start one (this host is the source)", (CONTROL,), {
                "202": _json(_ref("Migration"), "started; follow it by its id")},
                body=_ref("StartRequest"), errors=("400", "404", "409", "413")),
        },
        "/api/v1/migrations/{id}": {"get": _op(
            "one record", _BOTH, {"200": _json({"anyOf": [_ref("Migration"),
                                                          _ref("RestartedMigration")]},
                                               "the record")},
            params=[_ID], errors=("401", "404"))},
        "/api/v1/migrations/{id}/cancel": {"post": _op(
            "cancel, until the process runs on the destination", (CONTROL,),
            {"202": _json(_ref("Migration"), "cancel requested")}, params=[_ID],
            errors=("404", "409"))},
        "/api/v1/incoming": {"post": _op(
            "agent to agent: prepare as the destination", (CONTROL,),
            {"200": _json(_obj({"problems": {"type": "array", "items": _STR}},
                               required=("problems",)), "empty problems: prepared")},
            body=_ref("IncomingRequest"), errors=("400", "409", "413"))},
        "/api/v1/incoming/{id}/{action}": {"post": _op(
            "agent to agent: a step of an incoming migration", (CONTROL,),
            {"200": _json({"type": "object", "additionalProperties": True},
                          "the step's result")},
            params=[_ID, {"name": "action", "in": "path", "required": True,
                          "schema": {"type": "string", "enum": list(INCOMING_ACTIONS)}}],
            body=_ref("IncomingAction"), errors=("400", "404", "409", "413"))},
        "/api/v1/events": {"get": _op(
            "server-sent events: phase changes and progress of every migration; each "
            "event's data is JSON with the record as it is then; a comment every 15 s "
            "keeps the stream alive", _BOTH,
            {"200": {"description": "text/event-stream; event names: snapshot, created, "
                                    "phase, round, frozen, running, status, filled, "
                                    "progress, ...",
                     "content": {"text/event-stream": {"schema": {"type": "string"},
                                                       "x-event-data": _ref("Event")}}}},
            params=[{"name": "migration", "in": "query", "required": False,
                     "schema": {"type": "string", "pattern": ID_PATTERN},
                     "description": "only this migration's events"}],
            errors=("400", "401"))},
        "/api/v1/openapi.json": {"get": _op(
            "this document", _BOTH, {"200": _json({"type": "object"}, "OpenAPI 3.1")},
            errors=_RO_ERRORS)},
        "/metrics": {"get": _op(
            "Prometheus exposition", _BOTH,
            {"200": {"description": "text format 0.0.4",
                     "content": {"text/plain": {"schema": {"type": "string"}}}}},
            errors=_RO_ERRORS)},
        "/": {"get": _op(
            "the dashboard", _BOTH,
            {"200": {"description": "HTML; open it with ?access_token=TOKEN when the "
                                    "listener wants one", "content": {"text/html": {
                "schema": {"type": "string"}}}}}, errors=())},
        "/dashboard/{file}": {"get": _op(
            "the dashboard's files", _BOTH,
            {"200": {"description": "a static file", "content": {"*/*": {
                "schema": {"type": "string"}}}}},
            params=[{"name": "file", "in": "path", "required": True,
                     "schema": {"type": "string", "enum": list(DASHBOARD_FILES)}}],
            errors=("404",))},
    },
    "components": {
        "schemas": {"Migration": MIGRATION, "RestartedMigration": RESTARTED,
                    "Options": OPTIONS, "Round": ROUND, "Phase": PHASE, "Error": ERROR,
                    "Event": EVENT, "StartRequest": START, "IncomingRequest": INCOMING,
                    "IncomingAction": INCOMING_ACTION},
        "securitySchemes": {"mutualTLS": {"type": "mutualTLS"},
                            "statusToken": {"type": "http", "scheme": "bearer"}},
    },
}


# --------------------------------------------------------------------------
# request validation: the subset of JSON Schema the document uses

class Invalid(ValueError):
    pass


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool,
          "null": type(None)}


def _is(value, t: str) -> bool:
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[t])


def check(value, schema: dict, where: str = "body") -> None:
    """Raise Invalid naming the first field of ``value`` that ``schema``
    refuses."""
    if "$ref" in schema:
        schema = OPENAPI["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    if "anyOf" in schema:
        for s in schema["anyOf"]:
            try:
                return check(value, s, where)
            except Invalid:
                continue
        raise Invalid(f"{where}: matches none of the allowed forms")
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_is(value, t) for t in types):
            raise Invalid(f"{where} must be {' or '.join(types)}, not "
                          f"{type(value).__name__ if value is not None else 'null'}")
    if "enum" in schema and value not in schema["enum"]:
        raise Invalid(f"{where} must be one of {', '.join(map(str, schema['enum']))}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise Invalid(f"{where} must be at least {schema['minimum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            raise Invalid(f"{where} must be over {schema['exclusiveMinimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise Invalid(f"{where} must be at most {schema['maximum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            raise Invalid(f"{where} must not be empty")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise Invalid(f"{where} is longer than {schema['maxLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            raise Invalid(f"{where} must match {schema['pattern']}")
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise Invalid(f"{where} has more than {schema['maxItems']} items")
        for i, v in enumerate(value):
            check(v, schema.get("items", {}), f"{where}[{i}]")
    if isinstance(value, dict):
        for k in schema.get("required", ()):
            if k not in value:
                raise Invalid(f"{where}: {k} is missing")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                check(v, props[k], f"{where}.{k}" if where != "body" else k)
            elif extra is False:
                raise Invalid(f"{where}: unknown field {k!r}" if where != "body"
                              else f"unknown field {k!r}")
            elif isinstance(extra, dict):
                check(v, extra, f"{where}.{k}")


def _operation(request) -> dict | None:
    route = request.match_info.route
    resource = getattr(route, "resource", None)
    if resource is None:
        return None
    return OPENAPI["paths"].get(resource.canonical, {}).get(request.method.lower())


@web.middleware
async def _validate(request, handler):
    op = _operation(request)
    # Parameters first: they end up in messages (an HTTP reason cannot hold
    # CR or LF: aiohttp raises ValueError, a 500).
    for p in (op or {}).get("parameters", ()):
        src = request.match_info if p["in"] == "path" else request.query
        if p["name"] in src:
            try:
                check(src[p["name"]], p["schema"], p["name"])
            except Invalid as e:
                raise web.HTTPBadRequest(reason=str(e)) from None
    body = (op or {}).get("requestBody")
    if body is not None:
        from migrate.orchestrator.agent import _body
        data = await _body(request)       # 400 unless a JSON object; 413 when oversized
        try:
            check(data, body["content"]["application/json"]["schema"])
        except Invalid as e:
            raise web.HTTPBadRequest(reason=str(e)) from None
    return await handler(request)


# --------------------------------------------------------------------------
# metrics

_registries: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _histogram(values, buckets) -> tuple[list, float]:
    out = [(str(b), sum(1 for v in values if v <= b)) for b in buckets]
    out.append(("+Inf", len(values)))
    return out, float(sum(values))


class RecordCollector:
    """Every metric, from the agent's migration records at scrape time."""

    def __init__(self, agent) -> None:
        self.agent = weakref.proxy(agent)

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)
        ms = list(self.agent.migrations.values())
        roles = ("source", "destination")
        info = GaugeMetricFamily("migrate_agent_info", "This agent", labels=["host",
                                                                             "version"])
        info.add_metric([self.agent.name, __version__], 1)
        yield info
        total = CounterMetricFamily("migrate_migrations", "Migrations that ended, by this "
                                    "host's role and how they ended",
                                    labels=["role", "status"])
        for role in roles:
            for status in (mig.COMPLETED, mig.FAILED, mig.CANCELLED):
                total.add_metric([role, status], sum(1 for m in ms if m.role == role
                                                     and m.status == status))
        yield total
        active = GaugeMetricFamily("migrate_active_migrations", "Migrations in progress",
                                   labels=["role"])
        for role in roles:
            active.add_metric([role], sum(1 for m in ms if m.role == role and not m.done))
        yield active
        src = [m for m in ms if m.role == "source"]
        sent = CounterMetricFamily("migrate_bytes_transferred", "Bytes this host sent to "
                                   "destinations' page-servers", labels=[])
        sent.add_metric([], sum(m.bytes_transferred for m in src))
        yield sent
        rounds = CounterMetricFamily("migrate_precopy_rounds", "Pre-copy rounds run",
                                     labels=[])
        rounds.add_metric([], sum(len(m.rounds) for m in src))
        yield rounds
        pages = CounterMetricFamily("migrate_precopy_pages", "Pages sent in pre-copy rounds",
                                    labels=[])
        pages.add_metric([], sum(r.pages for m in src for r in m.rounds))
        yield pages
        downtimes = [m.downtime for m in src if m.downtime is not None]
        h = HistogramMetricFamily("migrate_downtime_seconds", "Measured downtime of "
                                  "completed migrations: from the freeze here to the "
                                  "destination's answer", labels=[])
        b, s = _histogram(downtimes, DOWNTIME_BUCKETS)
        h.add_metric([], b, s)
        yield h
        durations = [m.total_time for m in src if m.done and m.total_time is not None]
        h = HistogramMetricFamily("migrate_migration_duration_seconds", "Total time of "
                                  "migrations that ended", labels=[])
        b, s = _histogram(durations, DURATION_BUCKETS)
        h.add_metric([], b, s)
        yield h
        fills = [m.fill for m in ms if m.role == "destination" and m.fill
                 and m.fill.get("done") and "faults" in m.fill]
        lat = HistogramMetricFamily("migrate_fault_latency_seconds", "Time restored "
                                    "processes waited on a userfaultfd fault for a page "
                                    "the background fill had not written yet", labels=[])
        counts: dict[float, int] = {}
        for f in fills:
            for b, n in f.get("fault_latency_buckets_us") or []:
                counts[b] = counts.get(b, 0) + n
        lat.add_metric([], [(str(b / 1e6), counts[b]) for b in sorted(counts)] +
                       [("+Inf", sum(f.get("faults", 0) for f in fills))],
                       sum(f.get("blocktime_total_us", 0.0) for f in fills) / 1e6)
        yield lat
        last = GaugeMetricFamily("migrate_fault_latency_last_seconds", "The last fill's "
                                 "fault latency quantiles", labels=["quantile"])
        if fills:
            for q, k in (("0.5", "fault_latency_p50_us"), ("0.99", "fault_latency_p99_us")):
                last.add_metric([q], fills[-1].get(k, 0.0) / 1e6)
        yield last
        filled = CounterMetricFamily("migrate_postcopy_pages", "Pages the lazy-pages "
                                     "daemon filled here, by why", labels=["kind"])
        for kind in ("fault", "prefetch"):
            filled.add_metric([kind], sum(f.get(f"pages_{kind}", 0) for f in fills))
        yield filled


def registry(agent):
    """This agent's own registry (not the process-wide default one)."""
    reg = _registries.get(agent)
    if reg is None:
        from prometheus_client import CollectorRegistry
        reg = CollectorRegistry(auto_describe=False)
        reg.register(RecordCollector(agent))
        _registries[agent] = reg
    return reg


# --------------------------------------------------------------------------
# handlers

ROUTES = web.RouteTableDef()


@ROUTES.get("/api/v1/openapi.json")
async def openapi(request):
    return web.json_response(OPENAPI)


@ROUTES.get("/metrics")
async def metrics(request):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    body = generate_latest(registry(request.app["agent"]))
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@ROUTES.get("/")
async def dashboard(request):
    return web.FileResponse(os.path.join(DASHBOARD, "index.html"))


@ROUTES.get("/dashboard/{file}")
async def dashboard_file(request):
    name = request.match_info["file"]
    if name not in DASHBOARD_FILES:
        raise web.HTTPNotFound(reason=f"no dashboard file {name!r}")
    return web.FileResponse(os.path.join(DASHBOARD, name))


def _sse(kind: str, data: dict, seq: int) -> bytes:
    return (f"id: {seq}\nevent: {kind}\ndata: {json.dumps(data, default=str)}\n\n"
            ).encode()


@ROUTES.get("/api/v1/events")
async def events(request):
    agent = request.app["agent"]
    want = request.query.get("migration")
    closing: asyncio.Event = request.app[CLOSING]
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    q: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_MAX)
    agent.listeners.add(q)
    seq = 0

    def ours(mid) -> bool:
        return want is None or mid == want

    async def send(kind: str, data: dict) -> None:
        nonlocal seq, last_write
        seq += 1
        await resp.write(_sse(kind, data, seq))
        last_write = time.monotonic()

    last_write = time.monotonic()
    last_progress = time.monotonic()
    stop = asyncio.ensure_future(closing.wait())
    try:
        await resp.write(b"retry: 2000\n\n")
        for m in list(agent.migrations.values()):
            if ours(m.id):
                await send("snapshot", {"type": "snapshot", "id": m.id, "time": time.time(),
                                        "record": m.as_dict()})
        while not closing.is_set():
            active = [m for m in agent.migrations.values() if not m.done and ours(m.id)]
            now = time.monotonic()
            wait = KEEPALIVE_S - (now - last_write)
            if active:
                wait = min(wait, PROGRESS_S - (now - last_progress))
            get = asyncio.ensure_future(q.get())
            done, _ = await asyncio.wait({get, stop}, timeout=max(wait, 0.0),
                                         return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
            else:
                ev = get.result()
                m = agent.migrations.get(ev.get("id"))
                if m is not None and ours(m.id):
                    await send(ev["type"], {**ev, "record": m.as_dict()})
            now = time.monotonic()
            if active and now - last_progress >= PROGRESS_S:
                last_progress = now
                for m in active:
                    await send("progress", {"type": "progress", "id": m.id,
                                            "time": time.time(), "record": m.as_dict()})
            if time.monotonic() - last_write >= KEEPALIVE_S:
                await resp.write(b": keep-alive\n\n")
                last_write = time.monotonic()
    except (ConnectionError, RuntimeError):
        pass            # the client went away (RuntimeError: writing after close)
    finally:
        stop.cancel()
        agent.listeners.discard(q)
    return resp


async def _closing(app) -> None:
    app[CLOSING].set()


def add_routes(app: web.Application) -> None:
    """The control listener's app: the document's checks on request bodies,
    and the read-only routes (status ones are agent.py's)."""
    app.middlewares.append(_validate)
    app[CLOSING] = asyncio.Event()
    app.on_shutdown.append(_closing)
    app.add_routes(ROUTES)


# --------------------------------------------------------------------------
# the read-only listener

READ_ONLY_PATHS = sorted(p for p, ops in OPENAPI["paths"].items()
                         for o in ops.values() if STATUS in o["x-listeners"])


# The dashboard's files hold no data (its page passes ?access_token= on to
# the API and the event stream): a browser loads them without the token.
PUBLIC_PATHS = ("/",)


def _token_middleware(token: str):
    want = f"Bearer {token}".encode()

    @web.middleware
    async def need_token(request, handler):
        if request.path in PUBLIC_PATHS or request.path.startswith("/dashboard/"):
            return await handler(request)
        got = request.headers.get("Authorization", "")
        if not got and "access_token" in request.query:
            got = "Bearer " + request.query["access_token"]
        if not hmac.compare_digest(got.encode(errors="replace"), want):
            return web.json_response({"error": "this listener needs "
                                      "\"Authorization: Bearer TOKEN\" (status_token)"},
                                     status=401, headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)
    return need_token


def status_app(agent) -> web.Application:
    """GET only: the operations whose x-listeners name the status listener."""
    from migrate.orchestrator import agent as agent_mod
    mws = [agent_mod._errors_as_json]
    if agent.cfg.status_token:
        mws.append(_token_middleware(agent.cfg.status_token))
    mws.append(_validate)
    app = web.Application(client_max_size=agent_mod.MAX_BODY, middlewares=mws)
    app["agent"] = agent
    app[CLOSING] = asyncio.Event()
    app.on_shutdown.append(_closing)
    handlers = {r.path: r.handler for r in list(agent_mod.ROUTES) + list(ROUTES)
                if isinstance(r, web.RouteDef) and r.method == "GET"}
    for path in READ_ONLY_PATHS:
        app.router.add_get(path, handlers[path])
    return app


async def start_status(agent) -> None:
    cfg = agent.cfg
    if not cfg.status_port:
        return
    runner = web.AppRunner(status_app(agent), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.status_address, cfg.status_port, reuse_address=True)
    try:
        await site.start()
    except OSError as e:
        # The control listener serves all of it anyway: not a reason to stop.
        log.error("agent %s: status listener on %s:%d: %s: not serving it", agent.name,
                  cfg.status_address, cfg.status_port, e.strerror or e)
        await runner.cleanup()
        return
    agent.status_runner = runner
    log.info("agent %s: read-only status on http://%s:%d/%s", agent.name,
             cfg.status_address, cfg.status_port,
             " (bearer token)" if cfg.status_token else "")


async def stop_status(agent) -> None:
    runner, agent.status_runner = agent.status_runner, None
    if runner is not None:
        await runner.shutdown()
        await runner.cleanup()
