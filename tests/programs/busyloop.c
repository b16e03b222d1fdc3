/*
 * busyloop: pure CPU work, never entering the kernel voluntarily, so dumps
 * interrupt it at arbitrary instructions with live state in registers.
 * Runs a xorshift hash chain until SIGTERM, then recomputes the chain from
 * scratch for the same number of steps and compares.  Every 2^20 steps the
 * current value is also saved to memory and checked in the recomputation.
 */
#include "lib.h"

#include <stdint.h>
#include <stdio.h>

#define SEED 0x0123456789abcdefULL
#define TRAIL 1024	/* saved values, one per 2^20 steps (ring) */

static uint64_t trail[TRAIL];

static inline uint64_t step(uint64_t x, uint64_t i)
{
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return x + i * 0x9E3779B97F4A7C15ULL;
}

int main(int argc, char **argv)
{
	uint64_t h = SEED, n = 0, r = SEED;
	char msg[64];

	test_init(argc, argv);
	test_ready();

	while (!test_stop) {	/* test_stop is volatile: re-read each step */
		h = step(h, n);
		n++;
		if ((n & 0xfffff) == 0)
			trail[(n >> 20) % TRAIL] = h;
	}

	for (uint64_t i = 0; i < n; i++) {
		r = step(r, i);
		if (((i + 1) & 0xfffff) == 0 && i + 1 + ((uint64_t)TRAIL << 20) > n &&
		    trail[((i + 1) >> 20) % TRAIL] != r)
			fail("saved value after %llu steps: %#llx, recomputed %#llx",
			     (unsigned long long)(i + 1),
			     (unsigned long long)trail[((i + 1) >> 20) % TRAIL],
			     (unsigned long long)r);
	}
	if (r != h)
		fail("hash after %llu steps: %#llx, recomputed %#llx",
		     (unsigned long long)n, (unsigned long long)h, (unsigned long long)r);
	if (n == 0)
		fail("loop never ran");
	snprintf(msg, sizeof(msg), "busyloop: %llu steps\n", (unsigned long long)n);
	test_msg(msg);
	pass();
}
