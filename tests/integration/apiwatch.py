"""Follow an agent's status API from inside a rig host (stdlib only): the
event stream (/api/v1/events) and, meanwhile, the record polled every
50 ms.  Writes one JSON line per SSE event ({"sse": kind, "data": ...}) and
per poll ({"poll": record}) to OUT; prints READY once the stream is open;
ends once the stream brought the end (status event, not active) of a
migration with role ROLE, or after TIMEOUT seconds.

    apiwatch.py BASE_URL OUT [ROLE] [TIMEOUT]
"""

import json
import sys
import threading
import time
import urllib.request

base, out = sys.argv[1], sys.argv[2]
role = sys.argv[3] if len(sys.argv) > 3 else "source"
timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 180
lock = threading.Lock()
done = threading.Event()
f = open(out, "a")


def write(obj) -> None:
    with lock:
        f.write(json.dumps(obj) + "\n")
        f.flush()


def poll() -> None:
    while not done.is_set():
        with urllib.request.urlopen(base + "/api/v1/migrations", timeout=5) as r:
            for m in json.load(r)["migrations"]:
                write({"poll": m, "t": time.time()})
        time.sleep(0.05)


def follow() -> None:
    r = urllib.request.urlopen(base + "/api/v1/events", timeout=timeout)
    print("READY", flush=True)
    kind = None
    for raw in r:
        line = raw.decode().rstrip("\n")
        if line.startswith(":"):
            write({"comment": line})
        elif line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            write({"sse": kind, "data": data, "t": time.time()})
            rec = data.get("record") or {}
            if kind == "status" and rec.get("role") == role and rec.get("status") != "active":
                return


threading.Thread(target=poll, daemon=True).start()
t = threading.Thread(target=follow, daemon=True)
t.start()
t.join(timeout)
done.set()
time.sleep(0.1)
sys.exit(0 if not t.is_alive() else 3)
