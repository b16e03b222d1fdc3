/*
 * cowtree: private pages shared copy-on-write by fork must still be shared
 * after a restore, and every page must hold its own process's content.
 *
 *   R  fills AREA (64 MiB by default, `cowtree MIB`) of private anonymous
 *   |  memory, then forks C and D
 *   +- C  rewrites some pages, forks G, rewrites others
 *   |  +- G  rewrites others
 *   +- D  drops some pages (MADV_DONTNEED: they read as zeros)
 *
 * Page i of the first 7/8 of the area ("early": written by R before the
 * forks), by i % 8:
 *   0 6 7  nobody writes again: R, C, D and G share R's page
 *   1      C rewrites before forking G: C and G share C's page
 *   2      R rewrites after the forks: C, D, G keep the old content
 *   3      G rewrites
 *   4      C rewrites after forking G (G and R still share a page: a
 *          grandparent's page, not kept by the restore; content only)
 *   5      D drops it: zeros in D; R, C and G share it
 * The last 1/8 ("late", empty at the forks): R writes the even pages, C
 * (before forking G) the pages with i % 4 == 1 (C and G share them).
 *
 * After SIGTERM each process checks every byte of its area, then writes
 * its pagemap of the area into a shared table; R, once the others exited,
 * checks that every page that was shared parent -> child (R-C, R-D, C-G) is
 * one physical page in both (same PFN in /proc/self/pagemap: needs root).
 * MADV_NOHUGEPAGE keeps khugepaged from collapsing (and so copying) them.
 * `cowtree MIB content`: the content only (a restore that does not keep
 * the sharing: --lazy-pages).
 */
#define _GNU_SOURCE
#include "lib.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORDS (PAGE / 8)

enum { R, C, D, G, NPROC };
static const char *names[NPROC] = { "R", "C", "D", "G" };
enum { T_ZERO, T_ORIG, T_R2, T_R3, T_C, T_C2, T_G };

static unsigned long npages, early;
static uint64_t *area;
static uint64_t *table;        /* MAP_SHARED: NPROC pagemaps of the area */
static int me = R;
static int ready_w;
static int content_only;

static uint64_t word(unsigned long page, unsigned long w, int tag)
{
	return ((uint64_t)page << 20 | w) * 0x9E3779B97F4A7C15ULL ^ (uint64_t)tag << 56;
}

static void fill(unsigned long page, int tag)
{
	uint64_t *p = area + page * WORDS;

	for (unsigned long w = 0; w < WORDS; w++)
		p[w] = word(page, w, tag);
}

/* The tag each process must see in page i. */
static int expect(int who, unsigned long i)
{
	if (i < early) {
		switch (i % 8) {
		case 1: return who == C || who == G ? T_C : T_ORIG;
		case 2: return who == R ? T_R2 : T_ORIG;
		case 3: return who == G ? T_G : T_ORIG;
		case 4: return who == C ? T_C2 : T_ORIG;
		case 5: return who == D ? T_ZERO : T_ORIG;
		default: return T_ORIG;
		}
	}
	if (i % 2 == 0)
		return who == R ? T_R3 : T_ZERO;
	if (i % 4 == 1)
		return who == C || who == G ? T_C : T_ZERO;
	return T_ZERO;
}

static void check_content(void)
{
	for (unsigned long i = 0; i < npages; i++) {
		int tag = expect(me, i);
		uint64_t *p = area + i * WORDS;

		for (unsigned long w = 0; w < WORDS; w++) {
			uint64_t want = tag == T_ZERO ? 0 : word(i, w, tag);

			if (p[w] != want)
				fail("%s: page %lu word %lu is %#llx, expected %#llx (tag %d)",
				     names[me], i, w, (unsigned long long)p[w],
				     (unsigned long long)want, tag);
		}
	}
}

static void record_pagemap(void)
{
	int fd = open("/proc/self/pagemap", O_RDONLY);
	size_t want = npages * 8;
	size_t got = 0;
	off_t off = (off_t)((uintptr_t)area / PAGE * 8);

	if (fd < 0)
		fail("%s: open pagemap: %s", names[me], strerror(errno));
	while (got < want) {
		ssize_t n = pread(fd, (char *)(table + me * npages) + got, want - got,
				  off + (off_t)got);

		if (n <= 0)
			fail("%s: pread pagemap: %s", names[me], strerror(errno));
		got += (size_t)n;
	}
	close(fd);
}

/* Documentation/admin-guide/mm/pagemap.rst: the page itself (PFN, or swap
 * entry), present and swapped bits; 0 if neither. */
static uint64_t frame(int who, unsigned long i)
{
	uint64_t e = table[who * npages + i];

	if (!(e >> 62))
		return 0;
	return e & (3ULL << 62 | ((1ULL << 55) - 1));
}

static int shared_class(int parent, int child, unsigned long i)
{
	if (i >= early)
		return parent == C && child == G && i % 4 == 1;
	switch (i % 8) {
	case 0: case 6: case 7: return 1;
	case 1: return parent != R || child == D;
	case 2: return parent == C;
	case 3: return parent == R;
	case 4: return parent == R && child == D;
	case 5: return child != D;
	}
	return 0;
}

static void check_shared(int parent, int child)
{
	unsigned long want = 0, bad = 0, first = 0;

	for (unsigned long i = 0; i < npages; i++) {
		if (!shared_class(parent, child, i))
			continue;
		want++;
		if (!frame(parent, i) || !(frame(parent, i) & ((1ULL << 55) - 1)) ||
		    frame(parent, i) != frame(child, i)) {
			if (!bad++)
				first = i;
		}
	}
	if (bad)
		fail("%s-%s: %lu of %lu pages shared before are not shared (page %lu first: "
		     "%#llx vs %#llx)", names[parent], names[child], bad, want, first,
		     (unsigned long long)table[parent * npages + first],
		     (unsigned long long)table[child * npages + first]);
	char msg[128];

	snprintf(msg, sizeof(msg), "%s-%s: %lu pages shared\n", names[parent],
		 names[child], want);
	test_msg(msg);
}

static void signal_ready(void)
{
	if (write(ready_w, "x", 1) != 1)
		fail("%s: ready pipe", names[me]);
	close(ready_w);
}

static void wait_child(pid_t pid, int who)
{
	int st;

	if (waitpid(pid, &st, 0) != pid)
		fail("%s: waitpid(%s): %s", names[me], names[who], strerror(errno));
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
		fail("%s: %s ended with status %#x", names[me], names[who], st);
}

/* Check, record, and (children) exit. */
static void finish(void)
{
	check_content();
	record_pagemap();
}

int main(int argc, char **argv)
{
	unsigned long mib = 64;
	int ready[2];
	pid_t c, d;
	char buf[3];

	test_init(argc, argv);
	if (argc > 1)
		mib = strtoul(argv[1], NULL, 0);
	content_only = argc > 2 && !strcmp(argv[2], "content");
	npages = mib * 256;
	early = npages / 8 * 7;
	area = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
		    -1, 0);
	table = mmap(NULL, NPROC * npages * 8, PROT_READ | PROT_WRITE,
		     MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (area == MAP_FAILED || table == MAP_FAILED)
		fail("mmap: %s", strerror(errno));
	if (madvise(area, npages * PAGE, MADV_NOHUGEPAGE))
		fail("madvise(MADV_NOHUGEPAGE): %s", strerror(errno));
	for (unsigned long i = 0; i < early; i++)
		fill(i, T_ORIG);
	if (pipe(ready))
		fail("pipe: %s", strerror(errno));
	ready_w = ready[1];

	c = fork();
	if (c < 0)
		fail("fork C: %s", strerror(errno));
	if (c == 0) {
		pid_t g;

		me = C;
		close(ready[0]);
		for (unsigned long i = 0; i < npages; i++)
			if ((i < early && i % 8 == 1) || (i >= early && i % 4 == 1))
				fill(i, T_C);
		g = fork();
		if (g < 0)
			fail("fork G: %s", strerror(errno));
		if (g == 0) {
			me = G;
			for (unsigned long i = 3; i < early; i += 8)
				fill(i, T_G);
			signal_ready();
			test_waitsig();
			finish();
			_exit(0);
		}
		for (unsigned long i = 4; i < early; i += 8)
			fill(i, T_C2);
		signal_ready();
		test_waitsig();
		kill(g, SIGTERM);
		finish();
		wait_child(g, G);
		_exit(0);
	}
	d = fork();
	if (d < 0)
		fail("fork D: %s", strerror(errno));
	if (d == 0) {
		me = D;
		close(ready[0]);
		for (unsigned long i = 5; i < early; i += 8)
			if (madvise(area + i * WORDS, PAGE, MADV_DONTNEED))
				fail("D: madvise(MADV_DONTNEED): %s", strerror(errno));
		signal_ready();
		test_waitsig();
		finish();
		_exit(0);
	}
	for (unsigned long i = 2; i < early; i += 8)
		fill(i, T_R2);
	for (unsigned long i = early; i < npages; i += 2)
		fill(i, T_R3);
	close(ready[1]);
	for (size_t got = 0; got < 3;) {
		ssize_t n = read(ready[0], buf + got, 3 - got);

		if (n <= 0)
			fail("R: ready pipe: %zd", n);
		got += (size_t)n;
	}
	close(ready[0]);
	test_ready();
	test_waitsig();
	kill(c, SIGTERM);
	kill(d, SIGTERM);
	check_content();
	wait_child(c, C);
	wait_child(d, D);
	record_pagemap();
	if (!content_only) {
		check_shared(R, C);
		check_shared(R, D);
		check_shared(C, G);
	}
	pass();
}
