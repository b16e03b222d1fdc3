/*
 * memhog MIB: a large anonymous area, every page written with a pattern
 * before READY (so benchmarks measure warm memory, not first touch), checked
 * after SIGTERM.  Used by bench/dump_restore.py and the big-memory test.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "lib.h"

static uint64_t pattern(uint64_t i) { return i * 0x9E3779B97F4A7C15ull ^ 0xA5A5A5A5ull; }

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 64;
	size_t len = mib << 20, n = len / sizeof(uint64_t);
	uint64_t *p;

	test_init(argc, argv);
	p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		fail("mmap %zu MiB", mib);
	/* one word per 512 carries the pattern, so every page is present and distinct */
	for (size_t i = 0; i < n; i += 512)
		p[i] = pattern(i);
	test_ready();
	test_waitsig();
	for (size_t i = 0; i < n; i++) {
		uint64_t want = i % 512 ? 0 : pattern(i);
		if (p[i] != want)
			fail("word %zu at %p: %#lx, expected %#lx", i, (void *)&p[i],
			     (unsigned long)p[i], (unsigned long)want);
	}
	pass();
}
