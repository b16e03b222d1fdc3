"""The `migrate` command: parses flags (criu(8) names), sets up logging, calls
the packages.  No logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from migrate import __version__, errors

log = logging.getLogger("migrate")

# criu(8): -v0 silent, -v1 errors, -v2 warnings (default), -v3 info, -v4 debug
LEVELS = {0: logging.CRITICAL + 10, 1: logging.ERROR, 2: logging.WARNING, 3: logging.INFO,
          4: logging.DEBUG}


def _verbosity(value: str | None) -> int:
    return 2 if value is None else int(value)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", dest="verbosity", nargs="?", const="", default=None,
                   metavar="N", help="verbosity: -v0 silent .. -v4 debug; -v, -vv, ... "
                                     "add one level each (default 2: warnings)")
    p.add_argument("--verbosity", dest="verbosity_long", type=int, default=None,
                   metavar="N", help="same as -vN")
    p.add_argument("-o", "--log-file", metavar="FILE",
                   help="write the log to FILE (relative to -D/-W) instead of stderr")
    p.add_argument("-W", "--work-dir", metavar="DIR",
                   help="directory for logs and pidfiles (default: the -D directory)")
    p.add_argument("--display-stats", action="store_true",
                   help="print the operation's statistics at the end")


def _add_tcp(p: argparse.ArgumentParser, dump: bool) -> None:
    if dump:
        p.add_argument("--tcp-established", action="store_true",
                       help="dump established TCP connections (TCP_REPAIR); without it "
                            "a process with one is refused")
        p.add_argument("--skip-in-flight", action="store_true",
                       help="drop connections a listener has not accepted yet (their "
                            "clients reconnect) instead of refusing")
        p.add_argument("--tcp-close", action="store_true",
                       help="do not dump the state of established connections, nor lock "
                            "them: they come back closed")
    else:
        p.add_argument("--tcp-established", action="store_true",
                       help="accepted for criu compatibility: connections in the image "
                            "are always restored")
        p.add_argument("--tcp-close", action="store_true",
                       help="restore established connections as closed sockets")
    p.add_argument("--network-lock", choices=("nftables", "iptables", "skip"),
                   default=None, help="how packets of the connections are dropped between "
                                      "dump and restore (default: nftables, else iptables)")


def _add_incremental(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prev-images-dir", metavar="REL",
                   help="the parent image, relative to -D: only pages written since it "
                        "are copied")
    p.add_argument("--track-mem", action="store_true",
                   help="keep tracking dirty pages after this dump (with -R), for a later "
                        "incremental dump (pre-dump always tracks)")
    p.add_argument("--tracker", choices=("uffd", "soft-dirty"),
                   help="force a dirty-page tracker (default: uffd-wp where the kernel has "
                        "it, else soft-dirty)")


DEFAULT_PS_PORT = 27027


def _add_tls(p: argparse.ArgumentParser) -> None:
    from migrate.pageserver import tls
    p.add_argument("--tls-cacert", metavar="FILE",
                   help=f"CA certificate to check the peer with (default {tls.DEFAULT_CACERT})")
    p.add_argument("--tls-cacrl", metavar="FILE",
                   help=f"revoked certificates (default {tls.DEFAULT_CACRL} if present)")
    p.add_argument("--tls-cert", metavar="FILE",
                   help=f"our certificate (default {tls.DEFAULT_CERT})")
    p.add_argument("--tls-key", metavar="FILE", help=f"our key (default {tls.DEFAULT_KEY})")
    p.add_argument("--tls-no-cn-verify", action="store_true",
                   help="do not check that the server's certificate names --address")
    p.add_argument("--tls", action="store_true", help="use TLS (the default; criu compat)")
    p.add_argument("--no-tls", action="store_true",
                   help="plaintext TCP, no certificates (warns)")


def _add_page_server_client(p: argparse.ArgumentParser) -> None:
    p.add_argument("--page-server", action="store_true",
                   help="send the whole image to a `migrate page-server` (-D then holds "
                        "the log and a copy of the image without its pages, for the "
                        "next --prev-images-dir)")
    p.add_argument("--address", metavar="HOST", help="the page-server's address")
    p.add_argument("--port", type=int, default=DEFAULT_PS_PORT, metavar="N",
                   help=f"the page-server's port (default {DEFAULT_PS_PORT})")
    p.add_argument("--session", metavar="NAME",
                   help="session name: the image's directory under the server's -D "
                        "(default: the basename of -D)")
    p.add_argument("--ps-streams", type=int, default=1, metavar="N",
                   help="TCP streams to the page-server, where one cannot fill the link "
                        "(1..8, default 1)")
    p.add_argument("--compress", action="store_true",
                   help="zstd-compress pages to the page-server (slow links; off by "
                        "default)")
    p.add_argument("--max-bandwidth", type=_rate_arg, metavar="RATE",
                   help="send at most RATE bytes/s to the page-server, all streams "
                        "together: e.g. 50M, 1G (K, M, G, T: powers of 1024)")
    _add_tls(p)


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0 <= v < 1e6:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds, 0 or more")
    return v


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="migrate",
        description="Checkpoint, restore and live-migrate running Linux processes. "
                    "Commands and flags follow criu(8).")
    ap.add_argument("-V", "--version", action="version", version=f"migrate {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("dump", help="checkpoint a process into an image directory")
    d.add_argument("-t", "--tree", type=int, required=True, metavar="PID",
                   help="the process to dump")
    d.add_argument("-D", "--images-dir", required=True, metavar="DIR")
    d.add_argument("-R", "--leave-running", action="store_true",
                   help="leave the process running after the dump (default: kill it)")
    d.add_argument("-s", "--leave-stopped", action="store_true",
                   help="leave the process stopped (SIGSTOP) after the dump")
    d.add_argument("-j", "--shell-job", action="store_true",
                   help="the process is a job of a shell: dump its terminal fds")
    _add_tcp(d, dump=True)
    _add_incremental(d)
    _add_page_server_client(d)
    d.add_argument("--lazy-pages", action="store_true",
                   help="post-copy: leave the anonymous memory out of the image, kill the "
                        "process, and serve that memory to a `migrate lazy-pages "
                        "--page-server` on --address/--port until it has taken it all")
    _add_common(d)

    pd = sub.add_parser("pre-dump", help="copy memory while the process runs (incremental)")
    pd.add_argument("-t", "--tree", type=int, required=True, metavar="PID",
                    help="the process to pre-dump")
    pd.add_argument("-D", "--images-dir", required=True, metavar="DIR")
    _add_incremental(pd)
    _add_page_server_client(pd)
    _add_common(pd)

    ps = sub.add_parser("page-server", help="receive images over the network")
    ps.add_argument("-D", "--images-dir", required=True, metavar="DIR",
                    help="with --serve: sessions go into DIR/<session name>; without: "
                         "the one session goes into DIR")
    ps.add_argument("--address", default="0.0.0.0", metavar="HOST",
                    help="address to listen on (default 0.0.0.0)")
    ps.add_argument("--port", type=int, default=DEFAULT_PS_PORT, metavar="N",
                    help=f"port to listen on (default {DEFAULT_PS_PORT})")
    ps.add_argument("--serve", action="store_true",
                    help="keep serving any number of concurrent sessions (default: one "
                         "session, then exit, like criu)")
    ps.add_argument("-d", "--daemon", action="store_true",
                    help="run in the background once listening, stdin, stdout and stderr "
                         "on /dev/null (the log goes to -o, by default DIR/page-server.log)")
    ps.add_argument("--pidfile", metavar="FILE", help="write the server's PID to FILE")
    ps.add_argument("--status-fd", type=int, metavar="FD",
                    help="write \\0 to FD and close it once listening")
    ps.add_argument("--ps-socket", type=int, metavar="FD",
                    help="listen on this already bound socket (--address/--port ignored)")
    _add_tls(ps)
    _add_common(ps)

    ct = sub.add_parser("certs", help="make a CA and host certificates for mutual TLS")
    csub = ct.add_subparsers(dest="certs_command", metavar="ACTION")
    csub.required = True
    ci = csub.add_parser("init", help="make a CA in DIR (DIR/cacert.pem, "
                                      "DIR/private/cakey.pem)")
    ci.add_argument("dir", metavar="DIR")
    ci.add_argument("--force", action="store_true", help="replace an existing CA")
    cs = csub.add_parser("issue", help="make DIR/HOST/cert.pem and DIR/HOST/private/key.pem"
                                       " (server and client use)")
    cs.add_argument("dir", metavar="DIR")
    cs.add_argument("host", metavar="HOSTNAME", help="DNS name or IP address")
    cs.add_argument("--days", type=int, default=825, help="validity (default 825)")
    cs.add_argument("--ip", action="append", default=[], metavar="ADDR",
                    help="also name this IP address in the subjectAltName (repeatable)")
    cr = csub.add_parser("revoke", help="add HOST's certificate to DIR/cacrl.pem")
    cr.add_argument("dir", metavar="DIR")
    cr.add_argument("host", metavar="HOSTNAME")

    r = sub.add_parser("restore", help="bring a dumped process back at its PID")
    r.add_argument("-D", "--images-dir", required=True, metavar="DIR")
    r.add_argument("-d", "--restore-detached", action="store_true",
                   help="exit once the process runs (default: wait for it to exit and "
                        "exit with its status)")
    r.add_argument("--pidfile", metavar="FILE", help="write the restored PID to FILE")
    r.add_argument("-j", "--shell-job", action="store_true",
                   help="give the process this terminal and keep it in this session")
    r.add_argument("-s", "--leave-stopped", action="store_true",
                   help="leave the process stopped (SIGSTOP) after the restore")
    r.add_argument("--lazy-pages", action="store_true",
                   help="post-copy: leave the anonymous memory to a `migrate lazy-pages` "
                        "daemon (its socket: -W or -D /lazy-pages.socket)")
    _add_tcp(r, dump=False)
    _add_common(r)

    lz = sub.add_parser("lazy-pages", help="post-copy: supply the missing pages of a "
                                           "`restore --lazy-pages`")
    lz.add_argument("-D", "--images-dir", required=True, metavar="DIR",
                    help="the image (its pages, unless --page-server); the socket is "
                         "created in -W or here")
    lz.add_argument("--page-server", action="store_true",
                    help="fetch the pages from the source's `migrate dump --lazy-pages`")
    lz.add_argument("--address", metavar="HOST", help="the source's address")
    lz.add_argument("--port", type=int, default=DEFAULT_PS_PORT, metavar="N")
    lz.add_argument("--session", metavar="NAME",
                    help="session name on the source (default: the basename of -D)")
    lz.add_argument("--no-prefetch", action="store_true",
                    help="copy pages only when they are touched (no background copy)")
    lz.add_argument("--reconnect-timeout", type=_seconds, default=None, metavar="SEC",
                    help="with --page-server: how long a broken connection to the source "
                         "is made again, the faults held, before the daemon gives up and "
                         "kills the process (default 60; 0: give up at once)")
    lz.add_argument("--status-fd", type=int, metavar="FD",
                    help="write \\0 to FD and close it once listening")
    _add_tls(lz)
    _add_common(lz)

    nl = sub.add_parser("network-lock", help="set the network lock of an image here, ahead "
                                             "of its restore (which lifts it)")
    nl.add_argument("-D", "--images-dir", required=True, metavar="DIR")
    nl.add_argument("--network-lock", choices=("nftables", "iptables"), default=None,
                    help="backend (default: nftables, else iptables)")
    _add_common(nl)

    nu = sub.add_parser("network-unlock", help="lift the network lock a dump of PID left "
                                               "(the source, once the process runs elsewhere)")
    nu.add_argument("-t", "--tree", type=int, required=True, metavar="PID")
    nu.add_argument("--network-lock", choices=("nftables", "iptables"), default=None,
                    help="the backend the dump used (default: both are cleaned)")
    _add_common(nu)

    ag = sub.add_parser("agent", help="run this host's migration agent (HTTPS API, "
                                      "page-server, dumps and restores)")
    ag.add_argument("--config", required=True, metavar="FILE",
                    help="the agent's TOML config (see docs/orchestrator.md)")
    _add_common(ag)

    rn = sub.add_parser("run", help="live-migrate a process from one host to another")
    rn.add_argument("--src", required=True, metavar="HOST", help="the host it runs on")
    rn.add_argument("--dst", required=True, metavar="HOST", help="the host it moves to")
    rn.add_argument("--pid", "-t", type=int, required=True, metavar="PID",
                    help="the process (with its subtree), as the source host sees it")
    rn.add_argument("--downtime-limit", type=float, default=300, metavar="MS",
                    help="stop pre-copy once the predicted downtime is under this "
                         "(default 300 ms, like QEMU)")
    rn.add_argument("--max-bandwidth", type=_rate_arg, default=None, metavar="RATE",
                    help="cap on the pages' bandwidth, bytes/s with K/M/G (e.g. 100M)")
    rn.add_argument("--max-rounds", type=int, default=30, metavar="N",
                    help="at most N pre-copy rounds (default 30)")
    rn.add_argument("--auto-converge", action="store_true",
                    help="throttle the process's CPU while it dirties memory faster than "
                         "the link (20%%, then +10%% a round, up to 99%%)")
    rn.add_argument("--post-copy", choices=("off", "on", "auto"), default="off",
                    help="post-copy: resume on --dst at once, the pages dirtied since "
                         "the last pre-copy round fetched from the frozen source as the "
                         "process touches them (on), or only when pre-copy does not "
                         "converge (auto); default off")
    rn.add_argument("--no-pre-copy", action="store_true",
                    help="no pre-copy rounds: one stop-and-copy")
    rn.add_argument("--tcp-established", action="store_true",
                    help="move established TCP connections (behind the network lock)")
    rn.add_argument("--move-address", metavar="IP",
                    help="move this service address from --src to --dst during the stop")
    rn.add_argument("--restore-fill", choices=("auto", "lazy", "eager"), default="auto",
                    help="how the destination fills the memory it received: lazy (the "
                         "process resumes at once, a local lazy-pages daemon fills it in "
                         "the background), eager (before it resumes), auto (lazy from "
                         "32 MiB; the default)")
    rn.add_argument("--keep-images", action="store_true",
                    help="keep the images on both hosts after a successful migration")
    rn.add_argument("--detach", action="store_true",
                    help="start it and print its id; the source agent carries it on")
    rn.add_argument("--json", action="store_true", help="print the final record as JSON")
    rn.add_argument("--inventory", metavar="FILE",
                    help="hosts.toml (default $MIGRATE_INVENTORY or /etc/migrate/hosts.toml)")
    _add_common(rn)

    sa = sub.add_parser("status", help="migrations the agents know, or one of them")
    sa.add_argument("id", nargs="?", help="a migration id")
    sa.add_argument("--host", metavar="HOST", help="ask only this host's agent")
    sa.add_argument("--json", action="store_true")
    sa.add_argument("--inventory", metavar="FILE")
    _add_common(sa)

    ca = sub.add_parser("cancel", help="cancel a migration (the process stays on its "
                                       "source host)")
    ca.add_argument("id", help="the migration id")
    ca.add_argument("--host", metavar="HOST", help="the source host (default: ask all)")
    ca.add_argument("--inventory", metavar="FILE")
    _add_common(ca)

    s = sub.add_parser("show", help="decode image files to JSON (like crit)")
    s.add_argument("path", metavar="FILE|DIR")
    s.add_argument("--verify", action="store_true",
                   help="for a directory: check every file against the inventory")

    c = sub.add_parser("check", help="report which kernel features this host has")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--feature", metavar="NAME", help="check one feature (exit 1 if missing)")
    g.add_argument("--all", action="store_true", help="check every feature")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    return ap


def _setup_logging(args) -> None:
    v = getattr(args, "verbosity", None)
    if getattr(args, "verbosity_long", None) is not None:
        level = args.verbosity_long
    elif v is None:
        level = 2
    elif v.isdigit():
        level = int(v)
    elif set(v) <= {"v"}:
        level = 3 + len(v)   # -v is 3, -vv is 4
    else:
        raise SystemExit(f"migrate: bad verbosity -v{v}")
    level = max(0, min(4, level))
    fmt = "%(levelname)s %(name)s: %(message)s"
    if level >= 3:
        fmt = "%(asctime)s.%(msecs)03d " + fmt
    handler: logging.Handler
    logfile = getattr(args, "log_file", None)
    if logfile:
        base = getattr(args, "work_dir", None) or getattr(args, "images_dir", None) or "."
        path = logfile if os.path.isabs(logfile) else os.path.join(base, logfile)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        handler = logging.FileHandler(path)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])


def _print_stats(st) -> None:
    """The stats_entry in its proto3 JSON form (every field, 64-bit integers
    as strings), as json_format.MessageToDict gives it: the message is flat,
    and that module is a 16 ms import of every dump and restore."""
    m = st.to_pb()
    wide = (m.DESCRIPTOR.fields[0].CPPTYPE_INT64, m.DESCRIPTOR.fields[0].CPPTYPE_UINT64)
    print(json.dumps({f.name: str(getattr(m, f.name)) if f.cpp_type in wide
                      else getattr(m, f.name) for f in m.DESCRIPTOR.fields}, indent=2))


def _tls_context(args, server: bool):
    from migrate.pageserver import tls
    if args.no_tls:
        if args.tls:
            raise SystemExit("migrate: --tls and --no-tls together")
        log.warning("--no-tls: the image crosses the network in plaintext, unauthenticated")
        return None
    if server:
        return tls.server_context(args.tls_cacert, args.tls_cert, args.tls_key,
                                  args.tls_cacrl)
    return tls.client_context(args.tls_cacert, args.tls_cert, args.tls_key, args.tls_cacrl,
                              verify_cn=not args.tls_no_cn_verify)


def _sink(args):
    """The page-server client sink for dump/pre-dump --page-server, or None."""
    if not args.page_server:
        if args.max_bandwidth:
            raise SystemExit("migrate: --max-bandwidth needs --page-server")
        return None
    if not args.address:
        raise SystemExit("migrate: --page-server needs --address")
    from migrate.pageserver.client import PageServerSink
    os.makedirs(args.images_dir, exist_ok=True)      # logs only
    session = args.session or os.path.basename(os.path.normpath(
        os.path.abspath(args.images_dir)))
    return PageServerSink(args.address, args.port, session,
                          ssl_context=_tls_context(args, server=False),
                          streams=args.ps_streams, compress=args.compress,
                          mirror=args.images_dir, max_bandwidth=args.max_bandwidth)


def _with_sink(sink, fn, opts):
    """Run the dump; a session the dump never reached is aborted too."""
    try:
        return fn(opts, sink=sink)
    finally:
        if sink is not None and sink.inventory is None:
            sink.discard()


def cmd_dump(args) -> int:
    from migrate.source.dump import DumpOptions, dump
    serve_lazy = None
    if args.lazy_pages:
        if args.page_server or not args.address:
            raise SystemExit("migrate: dump --lazy-pages needs --address (and no "
                             "--page-server: the image is written to -D, its lazy pages "
                             "served from the frozen process)")
        serve_lazy = _lazy_server(args, _tls_context(args, server=True))
    sink = _sink(args)
    st = _with_sink(sink, dump, DumpOptions(
        pid=args.tree, images_dir=args.images_dir, leave_running=args.leave_running,
        leave_stopped=args.leave_stopped, shell_job=args.shell_job,
        prev_images_dir=args.prev_images_dir, track_mem=args.track_mem,
        tracker=args.tracker, serve_lazy=serve_lazy, tcp_established=args.tcp_established,
        tcp_close=args.tcp_close, skip_in_flight=args.skip_in_flight,
        network_lock=args.network_lock))
    if args.display_stats:
        _print_stats(st)
    return 0


def _lazy_server(args, ctx):
    """dump --lazy-pages: serve the frozen root's lazy pages to the daemon."""
    def serve(keeper) -> None:
        from migrate.pageserver import lazyserve
        session = os.path.basename(os.path.normpath(os.path.abspath(args.images_dir)))
        if lazyserve.serve(keeper.read, session, args.address, args.port, ctx,
                           read_runs=keeper.read_runs):
            raise errors.MigrateError(f"pid {keeper.image_pid}: stopped before the "
                                      "destination took every lazy page")
    return serve


def cmd_lazy_pages(args) -> int:
    from migrate.lazypages import daemon
    remote = None
    if args.page_server:
        if not args.address:
            raise SystemExit("migrate: lazy-pages --page-server needs --address")
        session = args.session or os.path.basename(os.path.normpath(
            os.path.abspath(args.images_dir)))
        remote = (args.address, args.port, session, _tls_context(args, server=False))
    sock = os.path.join(args.work_dir or args.images_dir, "lazy-pages.socket")
    out = (lambda d: print(json.dumps(d, indent=2), flush=True)) if args.display_stats \
        else None
    return daemon.run(args.images_dir, sock, remote=remote, prefetch=not args.no_prefetch,
                      status_fd=args.status_fd, stats_out=out,
                      recover=daemon.RECOVER_S if args.reconnect_timeout is None
                      else args.reconnect_timeout)


def cmd_pre_dump(args) -> int:
    from migrate.source.dump import DumpOptions, pre_dump
    sink = _sink(args)
    st = _with_sink(sink, pre_dump, DumpOptions(
        pid=args.tree, images_dir=args.images_dir, prev_images_dir=args.prev_images_dir,
        track_mem=True, tracker=args.tracker))
    if args.display_stats:
        _print_stats(st)
    return 0


def cmd_restore(args) -> int:
    from migrate.dest.restore import RestoreOptions, restore
    pidfile = args.pidfile
    if pidfile and not os.path.isabs(pidfile):
        pidfile = os.path.join(args.work_dir or args.images_dir, pidfile)
    pid, st = restore(RestoreOptions(images_dir=args.images_dir,
                                     detach=args.restore_detached, pidfile=pidfile,
                                     shell_job=args.shell_job,
                                     leave_stopped=args.leave_stopped,
                                     lazy_pages=args.lazy_pages,
                                     lazy_socket=os.path.join(args.work_dir or args.images_dir,
                                                              "lazy-pages.socket"),
                                     tcp_close=args.tcp_close,
                                     network_lock=args.network_lock))
    if args.display_stats:
        _print_stats(st)
    if args.restore_detached:
        return 0
    # Like criu: stay the parent and exit with the restored process's status.
    while True:
        try:
            _, status = os.waitpid(pid, 0)
        except InterruptedError:
            continue
        break
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 128 + os.WTERMSIG(status)


def cmd_network_lock(args) -> int:
    from migrate.dest.restore import lock_network
    n = lock_network(args.images_dir, args.network_lock)
    log.info("%d connection(s) locked", n)
    return 0


def cmd_network_unlock(args) -> int:
    from migrate.resources import netlock
    netlock.unlock_tree(args.tree, args.network_lock)
    return 0


def cmd_show(args) -> int:
    from migrate.images import ImageDir, decode_file
    path = args.path
    if os.path.isdir(path):
        d = ImageDir.open(path)
        if args.verify:
            d.verify_all()
        out = {"dir": path, "chain": _chain_summary(d),
               "files": [decode_file(os.path.join(path, "inventory.img"))]}
        for f in d.inventory.files:
            out["files"].append(decode_file(os.path.join(path, f.name)))
        if args.verify:
            out["verified"] = True
    else:
        out = decode_file(path)
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _chain_summary(d) -> list[dict]:
    """The image and its parents, with page counts by kind (PRESENT, IN_PARENT, ZERO)."""
    from migrate.images import ImageDir
    from migrate.images import pagemap as pm
    from migrate.images._pb import inventory_pb2
    out = []
    cur = d
    while True:
        inv = cur.inventory
        row = {"dir": cur.path, "kind": inventory_pb2.dump_kind.Name(inv.kind),
               "tracker": inv.tracker, "present": 0, "in_parent": 0, "zero": 0}
        name = f"pagemap-{inv.root_pid}.img"
        if cur.has(name):
            for e in cur.read_image(name)[1:]:
                for flag, key in ((pm.PE_PRESENT, "present"), (pm.PE_IN_PARENT, "in_parent"),
                                  (pm.PE_ZERO, "zero")):
                    if e.flags & flag:
                        row[key] += e.nr_pages
        out.append(row)
        if not inv.parent or len(out) > 256:
            return out
        cur = ImageDir.open(os.path.join(cur.path, "parent"))


def cmd_check(args) -> int:
    from migrate.source import check
    results = check.run(args.feature)
    if args.json:
        json.dump([r.as_dict() for r in results], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for r in results:
            mark = "yes" if r.ok else "NO "
            line = f"{mark}  {r.name:<16} {r.detail}"
            if not r.ok and r.disables:
                line += f"  (missing: {r.disables})"
            print(line)
    if args.feature:
        return 0 if results[0].ok else 1
    return 0


def cmd_page_server(args) -> int:
    from migrate.pageserver import server
    if args.daemon and not args.log_file:
        # The daemon lets go of our stderr (a caller reading it until EOF
        # would wait for the daemon's end): its log needs a file.
        args.log_file = "page-server.log"
        _setup_logging(args)
    pidfile = args.pidfile
    if pidfile and not os.path.isabs(pidfile):
        pidfile = os.path.join(args.work_dir or args.images_dir, pidfile)
    return server.run(args.images_dir, args.address, args.port,
                      ssl_context=_tls_context(args, server=True), serve=args.serve,
                      ps_socket=args.ps_socket, status_fd=args.status_fd, pidfile=pidfile,
                      daemon=args.daemon)


def _rate_arg(text: str) -> int:
    """A rate in bytes/s: a number with an optional K, M, G or T (powers of
    1024), e.g. 100M, 1.5G, 64MiB/s (orchestrator.policy.parse_rate)."""
    from migrate.orchestrator.policy import parse_rate
    try:
        return parse_rate(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_agent(args) -> int:
    from migrate.orchestrator import agent
    return agent.run(args.config)


def cmd_run(args) -> int:
    from migrate.orchestrator import run
    return run.main(run.run, args)


def cmd_status(args) -> int:
    from migrate.orchestrator import run
    return run.main(run.status, args)


def cmd_cancel(args) -> int:
    from migrate.orchestrator import run
    return run.main(run.cancel, args)


def cmd_certs(args) -> int:
    from migrate.pageserver import certs
    if args.certs_command == "init":
        print(certs.init(args.dir, force=args.force))
    elif args.certs_command == "issue":
        p = certs.issue(args.dir, args.host, days=args.days, ips=args.ip)
        print(f"--tls-cacert {certs.paths(args.dir)['cacert']} --tls-cert {p['cert']} "
              f"--tls-key {p['key']}")
    else:
        print(certs.revoke(args.dir, args.host))
    return 0


COMMANDS = {"lazy-pages": cmd_lazy_pages, "network-lock": cmd_network_lock,
            "network-unlock": cmd_network_unlock, "page-server": cmd_page_server,
            "certs": cmd_certs, "dump": cmd_dump, "pre-dump": cmd_pre_dump,
            "restore": cmd_restore, "show": cmd_show, "check": cmd_check,
            "agent": cmd_agent, "run": cmd_run, "status": cmd_status, "cancel": cmd_cancel}


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    _setup_logging(args)
    try:
        return COMMANDS[args.command](args)
    except errors.MigrateError as e:
        log.error("%s", e)
        # With the log in a file (-o), say it on stderr too; -v0 stays silent.
        to_stderr = any(isinstance(h, logging.StreamHandler) and
                        not isinstance(h, logging.FileHandler) and
                        h.stream is sys.stderr for h in logging.getLogger().handlers)
        if not to_stderr and logging.getLogger().isEnabledFor(logging.ERROR):
            print(f"migrate {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
