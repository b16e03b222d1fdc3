/*
 * lazymem [MIB]: memory touched for the first time after a lazy restore, in
 * every way the lazy-pages daemon must follow.  Before READY: a private
 * anonymous area A (MIB, default 32) and three 4 MiB areas B, C, D, every
 * page written with a pattern.  After SIGTERM (the pages are still missing
 * when the daemon runs with --no-prefetch):
 *   - B is mremap'ed (grown and moved) and checked at its new place;
 *   - the first half of C is munmap'ed, the second half checked;
 *   - the first half of D is dropped with MADV_DONTNEED (must read zero),
 *     the second half checked;
 *   - a child is forked that checks the second half of A (UFFD_EVENT_FORK:
 *     its pages are missing in the child too);
 *   - 8 threads check the first half of A at once, page i by thread i % 8.
 */
#define _GNU_SOURCE
#include "lib.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096
#define SMALL (4u << 20)
#define NTHREADS 8

static uint8_t *A, *B, *C, *D;
static size_t a_pages;

static uint64_t pattern(uint64_t area, uint64_t page, uint64_t w)
{
	return ((area << 56) ^ (page * 0x9E3779B97F4A7C15ull)) + w * 0x100000001ull;
}

static void fill(uint8_t *p, size_t npages, uint64_t area)
{
	for (size_t i = 0; i < npages; i++) {
		uint64_t *q = (uint64_t *)(p + i * PAGE);
		q[0] = pattern(area, i, 0);
		q[257] = pattern(area, i, 257);
		q[511] = pattern(area, i, 511);
	}
}

/* 0 if page i of area holds its pattern (and zeros elsewhere) */
static int check_page(const uint8_t *p, size_t i, uint64_t area, char *why, size_t n)
{
	const uint64_t *q = (const uint64_t *)(p + i * PAGE);

	for (size_t w = 0; w < PAGE / 8; w++) {
		uint64_t want = (w == 0 || w == 257 || w == 511) ? pattern(area, i, w) : 0;
		if (q[w] != want) {
			snprintf(why, n, "area %lu page %zu word %zu: %#lx, expected %#lx",
				 (unsigned long)area, i, w, (unsigned long)q[w], (unsigned long)want);
			return -1;
		}
	}
	return 0;
}

struct job { int id; char why[160]; int bad; };

static void *checker(void *arg)
{
	struct job *j = arg;

	for (size_t i = j->id; i < a_pages / 2; i += NTHREADS)
		if (check_page(A, i, 1, j->why, sizeof(j->why))) {
			j->bad = 1;
			break;
		}
	return NULL;
}

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 32;
	size_t small = SMALL / PAGE;
	char why[160];
	pthread_t th[NTHREADS];
	struct job jobs[NTHREADS];
	int status;
	pid_t child;

	test_init(argc, argv);
	a_pages = (mib << 20) / PAGE;
	A = mmap(NULL, a_pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	B = mmap(NULL, SMALL, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	C = mmap(NULL, SMALL, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	D = mmap(NULL, SMALL, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (A == MAP_FAILED || B == MAP_FAILED || C == MAP_FAILED || D == MAP_FAILED)
		fail("mmap");
	fill(A, a_pages, 1);
	fill(B, small, 2);
	fill(C, small, 3);
	fill(D, small, 4);
	test_ready();
	test_waitsig();

	/* B: grown and moved */
	uint8_t *nb = mremap(B, SMALL, 2 * SMALL, MREMAP_MAYMOVE);
	if (nb == MAP_FAILED)
		fail("mremap");
	for (size_t i = 0; i < small; i++)
		if (check_page(nb, i, 2, why, sizeof(why)))
			fail("after mremap: %s", why);
	for (size_t i = 0; i < small; i++)
		if (nb[SMALL + i * PAGE] != 0)
			fail("grown part of B at page %zu is not zero", i);
	/* C: first half unmapped */
	if (munmap(C, SMALL / 2))
		fail("munmap");
	for (size_t i = small / 2; i < small; i++)
		if (check_page(C, i, 3, why, sizeof(why)))
			fail("after munmap: %s", why);
	/* D: first half dropped */
	if (madvise(D, SMALL / 2, MADV_DONTNEED))
		fail("madvise");
	for (size_t i = 0; i < small / 2; i++)
		for (size_t w = 0; w < PAGE; w += 512)
			if (D[i * PAGE + w])
				fail("D page %zu byte %zu not zero after MADV_DONTNEED", i, w);
	for (size_t i = small / 2; i < small; i++)
		if (check_page(D, i, 4, why, sizeof(why)))
			fail("after madvise: %s", why);
	/* A: a child checks the second half, 8 threads the first */
	child = fork();
	if (child < 0)
		fail("fork");
	if (child == 0) {
		for (size_t i = a_pages / 2; i < a_pages; i++)
			if (check_page(A, i, 1, why, sizeof(why))) {
				char m[200];
				snprintf(m, sizeof(m), "child: %s\n", why);
				test_msg(m);
				_exit(1);
			}
		_exit(0);
	}
	for (int t = 0; t < NTHREADS; t++) {
		jobs[t].id = t;
		jobs[t].bad = 0;
		if (pthread_create(&th[t], NULL, checker, &jobs[t]))
			fail("pthread_create");
	}
	for (int t = 0; t < NTHREADS; t++)
		pthread_join(th[t], NULL);
	for (int t = 0; t < NTHREADS; t++)
		if (jobs[t].bad)
			fail("thread %d: %s", t, jobs[t].why);
	if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status))
		fail("the child found wrong memory (status %#x)", status);
	pass();
}
