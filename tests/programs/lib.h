/*
 * Tiny zdtm-style test library for the "migrate" workloads.
 *
 * Contract: a program calls test_init(), sets up its state, calls
 * test_ready() (writes "READY\n" to fd 1), then waits for SIGTERM
 * (test_waitsig() or its own loop on test_stop).  Between READY and SIGTERM
 * it may be dumped and restored any number of times.  After SIGTERM it checks
 * all of its state and ends with pass() ("PASS\n", exit 0) or
 * fail() ("FAIL: <why>\n", exit 1).
 *
 * The library creates no threads, fds, pipes or sockets: the dumper only
 * supports regular files and character devices.
 */
#ifndef MIGRATE_TEST_LIB_H
#define MIGRATE_TEST_LIB_H

#include <signal.h>

/* Set to 1 by the SIGTERM handler. */
extern volatile sig_atomic_t test_stop;

/* Install the SIGTERM handler (sigaction, flags 0: no SA_RESTART). */
void test_init(int argc, char **argv);

/* write(1, "READY\n", 6): stdout is an O_APPEND regular file, so no stdio. */
void test_ready(void);

/* Block until SIGTERM has arrived; the signal mask is left as it was. */
void test_waitsig(void);

/* Write "PASS\n" and exit(0). */
void pass(void) __attribute__((noreturn));

/* Write "FAIL: <message>\n" and exit(1). */
void fail(const char *fmt, ...)
	__attribute__((noreturn, format(printf, 1, 2)));

/* write(2) a whole string to fd 1 (retries short writes / EINTR). */
void test_msg(const char *s);

#endif
