"""halfpipe: pipes with one end closed everywhere.

fd 40: the read end of a pipe whose writer is gone, "last words" in flight
(then EOF); fd 41: the write end of a pipe whose reader is gone (EPIPE).
After SIGTERM both are checked; PASS or FAIL.
"""
import os, signal, sys, time
r, w = os.pipe(); os.write(w, b"last words"); os.close(w)
r2, w2 = os.pipe(); os.close(r2)
os.dup2(r, 40); os.dup2(w2, 41); os.close(r); os.close(w2)
signal.signal(signal.SIGPIPE, signal.SIG_IGN)
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
os.write(1, b"READY\n")
while not stop:
    time.sleep(0.01)
ok = os.read(40, 100) == b"last words" and os.read(40, 100) == b""
try:
    os.write(41, b"x"); ok = False
except BrokenPipeError:
    pass
os.write(1, b"PASS\n" if ok else b"FAIL: half-closed pipes\n")
sys.exit(0 if ok else 1)
