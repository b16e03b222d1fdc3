/*
 * memhog MIB: a large anonymous area, every page written with a pattern
 * before READY (so benchmarks measure warm memory, not first touch), checked
 * after SIGTERM.  Each SIGUSR1 rewrites 1% of its pages, chosen at random,
 * and prints "DIRTIED N" (for bench/predump.py); a ledger of generations
 * per page keeps the final check exact.  Used by the benches and tests.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "lib.h"

#define WORDS_PER_PAGE 512

static volatile sig_atomic_t dirty_requests;

static void on_usr1(int sig) { (void)sig; dirty_requests++; }

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
	struct sigaction sa = { .sa_handler = on_usr1 };
	sigset_t none;
	char msg[64];

	test_init(argc, argv);
	sigaction(SIGUSR1, &sa, NULL);
	p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	gen = calloc(npages, 1);
	if (p == MAP_FAILED || !gen)
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
	for (size_t i = 0; i < npages * WORDS_PER_PAGE; i++) {
		uint64_t want = i % WORDS_PER_PAGE ? 0 : pattern(i / WORDS_PER_PAGE,
								gen[i / WORDS_PER_PAGE]);
		if (p[i] != want)
			fail("word %zu at %p: %#lx, expected %#lx", i, (void *)&p[i],
			     (unsigned long)p[i], (unsigned long)want);
	}
	pass();
}
