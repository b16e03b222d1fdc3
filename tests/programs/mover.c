/*
 * mover [PAGES [signal]]: moves a data area around while it runs.  Three
 * slots of PAGES pages (default 512) between PROT_NONE guards: one holds
 * the data area, the others fresh untouched (zero) areas.  A step moves
 * the data area on a few slots (each move an mremap(MREMAP_FIXED) onto the
 * next slot, the zero area there gone, a fresh zero area mapped where it
 * was), then writes one page of it (a ledger says what every page must
 * hold) and reads a data page and a zero page; then it swaps two more data
 * areas of PAGES pages ("pair", each page's content fixed by the area and
 * the page) through a scratch place, so that data moves onto data.  Beside
 * them, a "still" area of PAGES data pages is written once and never moves.
 *
 * Without "signal" it steps every 200 us: frozen in that sleep (where it
 * spends its time), a post-copy restore runs on by moving the data area
 * onto a slot that was zero at the source before it touches a page, so a
 * lazy-pages daemon that places or drops pages by where they are now
 * rather than by where they were at the source loses data.
 * With "signal" it steps once per SIGUSR1, and then also maps a one-page
 * area (or unmaps the one it mapped), and writes "MOVED <n>".
 * After SIGTERM every page of every area is checked.
 */
#define _GNU_SOURCE
#include "lib.h"

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096
#define SLOTS 3

static size_t npages = 512;
static uint8_t *slot[SLOTS];
static uint8_t *still;
static uint8_t *pair[2], *scratch;	/* pair[k] holds area k's pages */
static uint8_t *extra;			/* the one-page area of signal mode */
static int data;			/* the slot the data area is in */
static uint32_t *gen;			/* per data page: what it holds */
static uint32_t generation = 1;
static unsigned long moves;
static volatile sig_atomic_t usr1;

static void on_usr1(int sig) { (void)sig; usr1++; }

static uint64_t word(uint64_t key, size_t i) { return (key + i) * 0x9E3779B97F4A7C15ull; }

static void fill(uint8_t *p, uint32_t g)
{
	uint64_t *q = (uint64_t *)p;

	for (size_t w = 1; w < PAGE / 8; w++)
		q[w] = word(g, w);
	q[0] = g;
}

static void check(const char *what, uint8_t *p, size_t i, uint32_t g)
{
	static const uint8_t zero[PAGE];
	uint8_t want[PAGE];

	if (g)
		fill(want, g);
	if (memcmp(p, g ? want : zero, PAGE))
		fail("%s page %zu at %p (data in slot %d, after %lu moves): generation %u "
		     "expected, header %lu", what, i, (void *)p, data, moves, g,
		     (unsigned long)*(uint64_t *)p);
}

static void check_data(size_t i) { check("data", slot[data] + i * PAGE, i, gen[i]); }

static void check_zero(int s, size_t i) { check("zero", slot[s] + i * PAGE, i, 0); }

static void check_still(size_t i) { check("still", still + i * PAGE, i, 0x5711 + i); }

static uint32_t pair_gen(int k, size_t i) { return 0xA000 + k * npages + i; }

static void check_pair(int k, size_t i) { check("pair", pair[k] + i * PAGE, i, pair_gen(k, i)); }

static void to(uint8_t *from, uint8_t *where)
{
	if (mremap(from, npages * PAGE, npages * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED,
		   where) != where)
		fail("mremap of %p to %p: %s", (void *)from, (void *)where, strerror(errno));
}

/* pair[0] and pair[1] change places: the data of each lands on the other's */
static void swap_pair(void)
{
	uint8_t *a = pair[0], *b = pair[1];

	to(a, scratch);
	to(b, a);
	to(scratch, b);
	if (mmap(scratch, npages * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
		 -1, 0) == MAP_FAILED)
		fail("mmap of the scratch place: %s", strerror(errno));
	pair[0] = b;
	pair[1] = a;
}

static void map_zero(int s)
{
	if (mmap(slot[s], npages * PAGE, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED)
		fail("mmap of slot %d: %s", s, strerror(errno));
}

static void move(void)
{
	int next = (data + 1) % SLOTS;

	if (mremap(slot[data], npages * PAGE, npages * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED,
		   slot[next]) != slot[next])
		fail("mremap of slot %d to %d: %s", data, next, strerror(errno));
	map_zero(data);
	data = next;
	moves++;
}

/* SLOTS + 1 moves (the data area ends one slot on) without touching the
 * memory, then one page written and a few read. */
static void step(size_t k)
{
	size_t i = (k * 7919) % npages;

	for (int m = 0; m < SLOTS + 1; m++)
		move();
	gen[i] = ++generation;
	fill(slot[data] + i * PAGE, gen[i]);
	check_data((k * 104729) % npages);
	check_zero((data + 1 + k % (SLOTS - 1)) % SLOTS, (k * 31) % npages);
	check_still((k * 613) % npages);
	swap_pair();
	check_pair(k % 2, (k * 337) % npages);
}

int main(int argc, char **argv)
{
	int signal_mode = argc > 2 && !strcmp(argv[2], "signal");
	struct sigaction sa = { .sa_handler = on_usr1 };
	uint8_t *base;
	char msg[160];

	test_init(argc, argv);
	if (argc > 1)
		npages = strtoul(argv[1], NULL, 0);
	if (npages < 1)
		fail("PAGES must be at least 1");
	sigaction(SIGUSR1, &sa, NULL);
	gen = calloc(npages, sizeof(*gen));
	base = mmap(NULL, ((SLOTS + 4) * (npages + 1) + 1) * PAGE, PROT_NONE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (!gen || base == MAP_FAILED)
		fail("no memory");
	for (int s = 0; s < SLOTS; s++) {
		slot[s] = base + (1 + s * (npages + 1)) * PAGE;
		map_zero(s);
	}
	still = mmap(base + (1 + SLOTS * (npages + 1)) * PAGE, npages * PAGE,
		     PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
	if (still == MAP_FAILED)
		fail("mmap of the still area: %s", strerror(errno));
	for (int k = 0; k < 2; k++) {
		pair[k] = mmap(base + (1 + (SLOTS + 1 + k) * (npages + 1)) * PAGE, npages * PAGE,
			       PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
			       -1, 0);
		if (pair[k] == MAP_FAILED)
			fail("mmap of a pair area: %s", strerror(errno));
	}
	scratch = base + (1 + (SLOTS + 3) * (npages + 1)) * PAGE;
	for (size_t i = 0; i < npages; i++) {
		gen[i] = ++generation;
		fill(slot[data] + i * PAGE, gen[i]);
		fill(still + i * PAGE, 0x5711 + i);
		for (int k = 0; k < 2; k++)
			fill(pair[k] + i * PAGE, pair_gen(k, i));
	}
	test_ready();
	for (size_t k = 0; !test_stop; k++) {
		if (!signal_mode) {
			usleep(200);
			step(k);
			continue;
		}
		if (!usr1) {
			usleep(1000);
			k--;
			continue;
		}
		usr1--;
		step(k);
		if (extra) {
			check("extra", extra, 0, 0xE7);
			munmap(extra, PAGE);
			extra = NULL;
		} else {
			extra = mmap(NULL, PAGE, PROT_READ | PROT_WRITE,
				     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			if (extra == MAP_FAILED)
				fail("mmap: %s", strerror(errno));
			fill(extra, 0xE7);
		}
		snprintf(msg, sizeof(msg), "MOVED %lu\n", moves);
		test_msg(msg);
	}
	for (size_t i = 0; i < npages; i++) {
		for (int s = 0; s < SLOTS; s++) {
			if (s == data)
				check_data(i);
			else
				check_zero(s, i);
		}
		check_still(i);
		check_pair(0, i);
		check_pair(1, i);
	}
	if (extra)
		check("extra", extra, 0, 0xE7);
	snprintf(msg, sizeof(msg), "mover: %lu moves of %zu pages; every page matches its "
		 "ledger\n", moves, npages);
	test_msg(msg);
	pass();
}
