/*
 * counter: the demo workload.  Every 100 ms increments a counter and writes
 * "count N\n" to stdout.  Each step checks that the counter went up by
 * exactly one since the previous step (the previous value is kept in a
 * separate variable), so a restore that loses or replays memory shows up.
 */
#include "lib.h"

#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	struct timespec tick = { 0, 100 * 1000 * 1000 };
	volatile long count = 0, last = 0;	/* volatile: really kept in memory */
	long bad_at = -1, bad_got = 0;
	char line[64];

	test_init(argc, argv);
	test_ready();

	while (!test_stop) {
		count = count + 1;
		/* Remember only the first broken step; report it after SIGTERM. */
		if (count != last + 1 && bad_at < 0) {
			bad_at = last;
			bad_got = count;
		}
		last = count;
		snprintf(line, sizeof(line), "count %ld\n", (long)count);
		test_msg(line);
		nanosleep(&tick, NULL);	/* EINTR (SIGTERM) just ends the loop */
	}

	if (bad_at >= 0)
		fail("counter step after %ld: expected %ld, got %ld",
		     bad_at, bad_at + 1, bad_got);
	if (count != last)
		fail("count %ld != last %ld after loop", (long)count, (long)last);
	if (count < 1)
		fail("counter never ran (count=%ld)", (long)count);
	pass();
}
