/*
 * dirtier [SEED]: keeps rewriting random pages while it is pre-dumped, and
 * keeps a ledger of what every page must hold.  Now and then it munmaps and
 * mmaps areas, mremaps them (grown and moved), mprotects them read-only and
 * back, and drops pages with madvise(MADV_DONTNEED) (they must read as zero).
 * Areas: private anonymous, MADV_HUGEPAGE anonymous, private file mappings
 * (COW'd pages and untouched file pages), MAP_SHARED anonymous and memfd
 * (shmem) mappings.
 * After SIGTERM every page of every area is checked against the ledger.
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
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define SLOTS 12
#define MAXPAGES 1024

enum kind { ANON, HUGE, FILEPRIV, SHARED, MEMFD, NKINDS };

struct slot {
	uint8_t *addr;
	size_t npages;
	enum kind kind;
	uint32_t gen[MAXPAGES];	/* 0: never written (zero, or the file's page) */
};

static struct slot slots[SLOTS];
static uint64_t rng = 88172645463325252ull;
static uint32_t generation = 1;
static int filefd = -1;
static char filepath[64];
static unsigned long ops[8];

static uint64_t rnd(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }

static uint64_t word(uint64_t key, size_t i) { return (key + i) * 0x9E3779B97F4A7C15ull; }

/* the file's own page i, for private file mappings never written */
static void file_page(uint8_t *buf, size_t i)
{
	for (size_t w = 0; w < PAGE / 8; w++)
		((uint64_t *)buf)[w] = word(0xF11E0000ull + i, w);
}

static void fill(uint8_t *p, uint32_t gen)
{
	uint64_t *q = (uint64_t *)p;

	for (size_t w = 1; w < PAGE / 8; w++)
		q[w] = word(gen, w);
	q[0] = gen;		/* the header word last */
}

static void check_page(struct slot *s, size_t i)
{
	uint8_t *p = s->addr + i * PAGE, want[PAGE];

	if (s->gen[i])
		fill(want, s->gen[i]);
	else if (s->kind == FILEPRIV)
		file_page(want, i);
	else
		memset(want, 0, PAGE);
	if (memcmp(p, want, PAGE))
		fail("slot %ld kind %d page %zu at %p: generation %u expected, header %lu",
		     (long)(s - slots), s->kind, i, (void *)p, s->gen[i],
		     (unsigned long)*(uint64_t *)p);
}

/* A memfd exists as an fd for a moment before it is mapped and closed, and
 * migrate refuses memfd fds: memfd slots are made before READY only, never
 * while the process may be dumped. */
static void map_slot(struct slot *s, int setup)
{
	int prot = PROT_READ | PROT_WRITE;

	s->kind = rnd() % (setup ? NKINDS : MEMFD);
	s->npages = 1 + rnd() % (s->kind == HUGE ? MAXPAGES : 256);
	if (s->kind == HUGE)
		s->npages = MAXPAGES;
	memset(s->gen, 0, sizeof(s->gen));
	if (s->kind == FILEPRIV)
		s->addr = mmap(NULL, s->npages * PAGE, prot, MAP_PRIVATE, filefd, 0);
	else if (s->kind == SHARED)
		s->addr = mmap(NULL, s->npages * PAGE, prot, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	else if (s->kind == MEMFD) {
		int fd = memfd_create("dirtier", MFD_CLOEXEC);

		if (fd < 0 || ftruncate(fd, s->npages * PAGE))
			fail("memfd_create");
		s->addr = mmap(NULL, s->npages * PAGE, prot, MAP_SHARED, fd, 0);
		close(fd);	/* only the mapping keeps it */
	}
	else
		s->addr = mmap(NULL, s->npages * PAGE, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (s->addr == MAP_FAILED)
		fail("mmap of %zu pages kind %d", s->npages, s->kind);
	if (s->kind == HUGE)
		madvise(s->addr, s->npages * PAGE, MADV_HUGEPAGE);
}

static void step(void)
{
	struct slot *s = &slots[rnd() % SLOTS];
	unsigned r = rnd() % 1000;

	if (r < 970) {			/* write a page */
		size_t i = rnd() % s->npages;

		s->gen[i] = ++generation;
		fill(s->addr + i * PAGE, s->gen[i]);
		ops[0]++;
	} else if (r < 976) {		/* drop pages: they read as zero (file: the file) */
		size_t i = rnd() % s->npages, n = 1 + rnd() % (s->npages - i);

		if (s->kind == SHARED || s->kind == MEMFD)
			return;		/* DONTNEED keeps shmem contents */
		madvise(s->addr + i * PAGE, n * PAGE, MADV_DONTNEED);
		memset(&s->gen[i], 0, n * sizeof(uint32_t));
		ops[1]++;
	} else if (r < 982) {		/* read-only for a moment, then writable */
		mprotect(s->addr, s->npages * PAGE, PROT_READ);
		for (size_t i = 0; i < s->npages; i += 7)
			check_page(s, i);
		mprotect(s->addr, s->npages * PAGE, PROT_READ | PROT_WRITE);
		ops[2]++;
	} else if (r < 990) {		/* grow and move */
		size_t n = s->npages + 1 + rnd() % 64;
		uint8_t *p;

		/* a file or shmem object does not grow with its mapping (SIGBUS) */
		if (n > MAXPAGES || s->kind != ANON)
			return;
		p = mremap(s->addr, s->npages * PAGE, n * PAGE, MREMAP_MAYMOVE);
		if (p == MAP_FAILED)
			fail("mremap of %zu pages at %p to %zu: %s", s->npages, (void *)s->addr, n, strerror(errno));
		s->addr = p;
		s->npages = n;	/* new tail pages: gen 0 */
		ops[3]++;
	} else {			/* replace the area */
		for (size_t i = 0; i < s->npages; i++)
			check_page(s, i);
		if (s->kind == MEMFD)
			return;	/* memfd slots stay: see map_slot() */
		munmap(s->addr, s->npages * PAGE);
		map_slot(s, 0);
		ops[4]++;
	}
}

int main(int argc, char **argv)
{
	uint8_t page[PAGE];
	char msg[256];

	test_init(argc, argv);
	if (argc > 1)
		rng ^= strtoull(argv[1], NULL, 0);
	strcpy(filepath, "/tmp/dirtier.XXXXXX");
	filefd = mkstemp(filepath);
	if (filefd < 0)
		fail("mkstemp");
	for (size_t i = 0; i < 256; i++) {
		file_page(page, i);
		if (write(filefd, page, PAGE) != PAGE)
			fail("writing %s", filepath);
	}
	for (int i = 0; i < SLOTS; i++)
		map_slot(&slots[i], 1);
	for (int i = 0; i < 20000; i++)
		step();
	test_ready();
	while (!test_stop) {
		for (int i = 0; i < 64 && !test_stop; i++)
			step();
		usleep(200);
	}
	for (int k = 0; k < SLOTS; k++)
		for (size_t i = 0; i < slots[k].npages; i++)
			check_page(&slots[k], i);
	snprintf(msg, sizeof(msg), "dirtier: %lu writes, %lu drops, %lu mprotects, "
		 "%lu mremaps, %lu remaps; every page matches its ledger\n",
		 ops[0], ops[1], ops[2], ops[3], ops[4]);
	test_msg(msg);
	close(filefd);
	unlink(filepath);
	pass();
}
