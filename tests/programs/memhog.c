/*
 * memhog MIB: a large anonymous area, every page written with a pattern
 * before READY (so benchmarks measure warm memory, not first touch), checked
 * after SIGTERM.  Each SIGUSR1 rewrites 1% of its pages, chosen at random,
 * and prints "DIRTIED N" (for bench/predump.py); a ledger of generations
 * per page keeps the final check exact.  Used by the benches and tests.
 *
 * memhog MIB timed: the check also times the first read of each page (a
 * fault, when the page is lazy) and prints "TOUCH_US p50 X p99 Y max Z"
 * before PASS: the fault latency as the faulting thread sees it.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "lib.h"

#define WORDS_PER_PAGE 512

static volatile sig_atomic_t dirty_requests;

static void on_usr1(int sig) { (void)sig; dirty_requests++; }

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static int by_value(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

static uint64_t pattern(uint64_t page, uint8_t gen)
{
	return (page * 0x9E3779B97F4A7C15ull ^ 0xA5A5A5A5ull) + gen * 0x100000001ull;
}

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 64;
	size_t len = mib << 20, npages = len / 4096;
	uint64_t *p, rng = 0x2545F4914F6CDD1Dull;
	uint8_t *gen;
	uint32_t *touch = NULL;
	struct sigaction sa = { .sa_handler = on_usr1 };
	sigset_t none;
	char msg[64];

	test_init(argc, argv);
	sigaction(SIGUSR1, &sa, NULL);
	p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	gen = calloc(npages, 1);
	if (argc > 2 && !strcmp(argv[2], "timed"))
		touch = calloc(npages, sizeof(*touch));
	if (p == MAP_FAILED || !gen || (argc > 2 && !touch))
		fail("allocating %zu MiB", mib);
	for (size_t i = 0; i < npages; i++)
		p[i * WORDS_PER_PAGE] = pattern(i, 0);
	test_ready();
	sigemptyset(&none);
	while (!test_stop) {
		sigsuspend(&none);
		while (dirty_requests > 0 && !test_stop) {
			size_t n = npages / 100;

			dirty_requests--;
			for (size_t k = 0; k < n; k++) {
				size_t i;

				rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
				i = rng % npages;
				gen[i]++;
				p[i * WORDS_PER_PAGE] = pattern(i, gen[i]);
			}
			snprintf(msg, sizeof(msg), "DIRTIED %zu\n", n);
			test_msg(msg);
		}
	}
	for (size_t pg = 0; pg < npages; pg++) {
		if (touch) {
			uint64_t t = now_ns();

			(void)*(volatile uint64_t *)&p[pg * WORDS_PER_PAGE];
			touch[pg] = (uint32_t)(now_ns() - t);
		}
		for (size_t i = pg * WORDS_PER_PAGE; i < (pg + 1) * WORDS_PER_PAGE; i++) {
			uint64_t want = i % WORDS_PER_PAGE ? 0 : pattern(pg, gen[pg]);

			if (p[i] != want)
				fail("word %zu at %p: %#lx, expected %#lx", i, (void *)&p[i],
				     (unsigned long)p[i], (unsigned long)want);
		}
	}
	if (touch) {
		qsort(touch, npages, sizeof(*touch), by_value);
		snprintf(msg, sizeof(msg), "TOUCH_US p50 %.1f p99 %.1f max %.1f\n",
			 touch[npages / 2] / 1e3, touch[npages * 99 / 100] / 1e3,
			 touch[npages - 1] / 1e3);
		test_msg(msg);
	}
	pass();
}
