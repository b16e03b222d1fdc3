#!/bin/bash
# selfcheck.sh [NAME...]: run each test program once WITHOUT any dump/restore
# to prove the programs themselves are correct.  For each program: start it
# with stdin from /dev/null and stdout/stderr appended to a log file, wait for
# READY (10 s), sleep 0.5 s, send SIGTERM, wait for the exit (10 s; pyloop
# 60 s) and require exit status 0 and a PASS line.  Only pids started here
# are signalled.  Exit status: number of failed programs.
set -u
here=$(cd "$(dirname "$0")" && pwd)

make -s -C "$here" || exit 100

if [ $# -gt 0 ]; then
	progs=("$@")
else
	progs=()
	for b in "$here"/bin/*; do progs+=("$(basename "$b")"); done
	progs+=(pyloop)
fi

logdir=$(mktemp -d /tmp/selfcheck.XXXXXX)
failed=0

# Children must start with only fds 0, 1, 2 (the contract), whatever this
# shell inherited; 255 is bash's own close-on-exec script fd.
close_extra_fds() {
	local f n
	for f in /proc/self/fd/*; do
		n=${f##*/}
		if [ "$n" -gt 2 ] && [ "$n" -ne 255 ]; then eval "exec $n>&-"; fi
	done
}

# Running = exists and not a zombie (kill -0 succeeds on zombies).
running() {
	local st
	st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
	[ -n "$st" ] && [ "$st" != Z ]
}

for name in "${progs[@]}"; do
	log=$logdir/$name.log
	: >"$log"
	if [ "$name" = pyloop ]; then
		cmd=(python3 "$here/pyloop.py"); limit=60
	else
		cmd=("$here/bin/$name"); limit=10
	fi
	start=$EPOCHREALTIME
	(close_extra_fds; exec "${cmd[@]}") </dev/null >>"$log" 2>&1 &
	pid=$!

	why=""
	for _ in $(seq 100); do
		grep -q '^READY$' "$log" && break
		running "$pid" || break
		sleep 0.1
	done
	if ! grep -q '^READY$' "$log"; then
		why="no READY within 10 s"
	else
		sleep 0.5
		kill -TERM "$pid" 2>/dev/null
		for _ in $(seq $((limit * 10))); do
			running "$pid" || break
			sleep 0.1
		done
		running "$pid" && why="still running ${limit} s after SIGTERM"
	fi
	if [ -n "$why" ] && running "$pid"; then
		kill -KILL "$pid" 2>/dev/null
	fi
	wait "$pid"
	rc=$?
	secs=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { print b - a }')
	if [ -z "$why" ] && [ "$rc" -ne 0 ]; then why="exit status $rc"; fi
	if [ -z "$why" ] && ! grep -q '^PASS$' "$log"; then why="no PASS line"; fi

	if [ -z "$why" ]; then
		printf 'ok    %-12s (%.1f s)\n' "$name" "$secs"
	else
		printf 'FAIL  %-12s %s (%.1f s); log tail:\n' "$name" "$why" "$secs"
		tail -n 5 "$log" | sed 's/^/      | /'
		failed=$((failed + 1))
	fi
done

if [ "$failed" -eq 0 ]; then
	rm -rf "$logdir"
	echo "all ${#progs[@]} programs passed"
else
	echo "$failed of ${#progs[@]} programs failed; logs in $logdir"
fi
exit "$failed"
