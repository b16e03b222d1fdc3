/*
 * mem_vmas: memory contents and VMA properties across many mapping kinds.
 * Every area gets its own pattern (word i of an area = hash(seed, i), the
 * seed mixing an area id with the area's address) before READY; after
 * SIGTERM contents, zero pages, permissions, file backing and THP flags are
 * verified.  Temp files live in /tmp/mem_vmas.XXXXXX (removed at exit).
 */
#define _GNU_SOURCE
#include "lib.h"

#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define KB 1024UL
#define MB (1024UL * KB)

static size_t pg;
static char tmpdir[] = "/tmp/mem_vmas.XXXXXX";
static char priv_path[64], shared_path[64];

static uint64_t pat(uint64_t seed, size_t i)
{
	uint64_t x = seed * 0x9E3779B97F4A7C15ULL + i * 0xBF58476D1CE4E5B9ULL + 1;

	x ^= x >> 31;
	x *= 0x94D049BB133111EBULL;
	return x ^ (x >> 29);
}

static uint64_t seed_of(int id, const void *base)
{
	return (uint64_t)id << 48 ^ (uintptr_t)base;
}

/* Word patterns; word index counts from the area base so offsets can vary. */
static void fill(void *base, size_t off, size_t len, uint64_t seed)
{
	uint64_t *w = base;

	for (size_t i = off / 8; i < (off + len) / 8; i++)
		w[i] = pat(seed, i);
}

static void check(const char *what, const void *base, size_t off, size_t len,
		  uint64_t seed)
{
	const uint64_t *w = base;

	for (size_t i = off / 8; i < (off + len) / 8; i++)
		if (w[i] != pat(seed, i))
			fail("%s: word at %p (offset %#zx): expected %#llx, got %#llx",
			     what, (void *)&w[i], i * 8,
			     (unsigned long long)pat(seed, i), (unsigned long long)w[i]);
}

static void check_zero(const char *what, const void *base, size_t off, size_t len)
{
	const uint64_t *w = base;

	for (size_t i = off / 8; i < (off + len) / 8; i++)
		if (w[i])
			fail("%s: word at %p (offset %#zx): expected 0, got %#llx",
			     what, (void *)&w[i], i * 8, (unsigned long long)w[i]);
}

/* Byte patterns for heap blocks, which need not be 8-byte sized. */
static void fillb(unsigned char *p, size_t len, uint64_t seed)
{
	for (size_t i = 0; i < len; i++)
		p[i] = (unsigned char)pat(seed, i);
}

static void checkb(const char *what, const unsigned char *p, size_t len, uint64_t seed)
{
	for (size_t i = 0; i < len; i++)
		if (p[i] != (unsigned char)pat(seed, i))
			fail("%s: byte at %p (offset %zu): expected %#x, got %#x", what,
			     (void *)&p[i], i, (unsigned char)pat(seed, i), p[i]);
}

static void *map(size_t len, int prot, int flags)
{
	void *p = mmap(NULL, len, prot, flags | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		fail("mmap(%zu) failed: %m", len);
	return p;
}

/*
 * Check the /proc/self/maps line covering addr: permissions, and the mapped
 * path if path != NULL.  With want_hg, also require "hg" in smaps VmFlags.
 */
static void check_vma(const char *what, const void *addr, const char *perms,
		      const char *path, int want_hg)
{
	FILE *f = fopen(want_hg ? "/proc/self/smaps" : "/proc/self/maps", "r");
	char line[512], p[8], name[256];
	unsigned long lo, hi, a = (uintptr_t)addr;
	int found = 0;

	if (!f)
		fail("%s: cannot open /proc/self/maps: %m", what);
	while (fgets(line, sizeof(line), f)) {
		if (found && want_hg && strncmp(line, "VmFlags:", 8) == 0) {
			if (!strstr(line, " hg"))
				fail("%s at %p: smaps VmFlags lack hg:%s", what, addr, line + 8);
			fclose(f);
			return;
		}
		name[0] = '\0';
		if (sscanf(line, "%lx-%lx %7s %*s %*s %*s %255s", &lo, &hi, p, name) < 3)
			continue;	/* an smaps detail line */
		if (found || a < lo || a >= hi)
			continue;
		found = 1;
		if (strcmp(p, perms))
			fail("%s at %p: maps perms %s, expected %s", what, addr, p, perms);
		if (path && strcmp(name, path))
			fail("%s at %p: maps path '%s', expected '%s'", what, addr, name, path);
		if (!want_hg)
			break;
	}
	fclose(f);
	if (!found)
		fail("%s at %p: no VMA in /proc/self/maps", what, addr);
	if (want_hg)
		fail("%s at %p: no VmFlags line in smaps", what, addr);
}

static int make_file(const char *path, size_t len, uint64_t seed)
{
	void *buf = map(len, PROT_READ | PROT_WRITE, MAP_PRIVATE);
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);

	if (fd < 0)
		fail("create %s: %m", path);
	fill(buf, 0, len, seed);
	if (write(fd, buf, len) != (ssize_t)len)
		fail("write %s: %m", path);
	munmap(buf, len);
	return fd;
}

/* Read the whole file back with read(2) and check it against seed. */
static void check_file(const char *path, size_t len, uint64_t seed)
{
	void *buf = map(len, PROT_READ | PROT_WRITE, MAP_PRIVATE);
	int fd = open(path, O_RDONLY);

	if (fd < 0 || read(fd, buf, len) != (ssize_t)len)
		fail("read back %s: %m", path);
	close(fd);
	check(path, buf, 0, len, seed);
	munmap(buf, len);
}

static void cleanup(void)
{
	unlink(priv_path);
	unlink(shared_path);
	rmdir(tmpdir);
}

int main(int argc, char **argv)
{
	const int RW = PROT_READ | PROT_WRITE, P = MAP_PRIVATE;
	enum { NSMALL = 1000, NLARGE = 4 };
	static unsigned char *small[NSMALL], *large[NLARGE];
	uint64_t stackbuf[256 * KB / 8];	/* a big array on the stack */
	const size_t PRIV_LEN = 16 * 4096, SH_LEN = 8 * 4096;
	const uint64_t PRIV_SEED = 0x1111, COW_SEED = 0x2222;
	const uint64_t SH_SEED = 0x3333, SH_SEED2 = 0x4444, SH_SEED3 = 0x5555;
	unsigned char *a1, *a64, *a8m, *untouched, *zero, *shanon, *shro, *ro, *none;
	unsigned char *hp, *raw, *priv, *shf, *mr, *mr_old, *brk0;
	volatile unsigned char sink = 0;
	int fd;

	test_init(argc, argv);
	pg = (size_t)sysconf(_SC_PAGESIZE);
	if (!mkdtemp(tmpdir))
		fail("mkdtemp: %m");
	snprintf(priv_path, sizeof(priv_path), "%s/priv.dat", tmpdir);
	snprintf(shared_path, sizeof(shared_path), "%s/shared.dat", tmpdir);
	atexit(cleanup);	/* also runs on fail(), which calls exit(1) */

	/* Private anonymous areas; the 8 MiB one has only every 3rd page touched. */
	a1 = map(pg, RW, P);
	fill(a1, 0, pg, seed_of(1, a1));
	a64 = map(64 * KB, RW, P);
	fill(a64, 0, 64 * KB, seed_of(2, a64));
	a8m = map(8 * MB, RW, P);
	for (size_t off = 0; off < 8 * MB; off += 3 * pg)
		fill(a8m, off, pg, seed_of(3, a8m));
	untouched = map(1 * MB, RW, P);
	zero = map(256 * KB, RW, P);
	for (size_t off = 0; off < 256 * KB; off += pg)
		sink += zero[off];	/* read faults map the shared zero page */

	shanon = map(128 * KB, RW, MAP_SHARED);
	fill(shanon, 0, 128 * KB, seed_of(4, shanon));
	/* Shared anonymous, written, then read-only: a restore cannot force a
	 * write into it through /proc/PID/mem. */
	shro = map(64 * KB, RW, MAP_SHARED);
	fill(shro, 0, 64 * KB, seed_of(14, shro));
	if (mprotect(shro, 64 * KB, PROT_READ))
		fail("mprotect shared ro: %m");
	ro = map(64 * KB, RW, P);
	fill(ro, 0, 64 * KB, seed_of(5, ro));
	none = map(64 * KB, RW, P);
	fill(none, 0, 64 * KB, seed_of(6, none));
	if (mprotect(ro, 64 * KB, PROT_READ) || mprotect(none, 64 * KB, PROT_NONE))
		fail("mprotect: %m");

	/* Heap: small brk chunks, large mmap'd chunks, then raw sbrk growth. */
	for (int i = 0; i < NSMALL; i++) {
		size_t n = 1 + (size_t)i * 37 % 200;

		if (!(small[i] = malloc(n)))
			fail("malloc(%zu)", n);
		fillb(small[i], n, seed_of(7, small[i]));
	}
	for (int i = 0; i < NLARGE; i++) {
		if (!(large[i] = malloc(MB + (size_t)i * 4096)))
			fail("malloc large");
		fillb(large[i], MB + (size_t)i * 4096, seed_of(8, large[i]));
	}
	brk0 = sbrk(256 * KB);
	if (brk0 == (void *)-1)
		fail("sbrk: %m");
	fillb(brk0, 256 * KB, seed_of(9, brk0));

	fill(stackbuf, 0, sizeof(stackbuf), seed_of(10, stackbuf));
	asm volatile("" : : "r"(stackbuf) : "memory");	/* keep it in memory */

	/* A 4 MiB-aligned MADV_HUGEPAGE area, carved out of a bigger mapping. */
	raw = map(8 * MB, RW, P);
	hp = (unsigned char *)(((uintptr_t)raw + 4 * MB - 1) & ~(4 * MB - 1));
	if (hp > raw)
		munmap(raw, (size_t)(hp - raw));
	munmap(hp + 4 * MB, (size_t)(raw + 8 * MB - (hp + 4 * MB)));
	if (madvise(hp, 4 * MB, MADV_HUGEPAGE))
		fail("madvise(MADV_HUGEPAGE): %m");
	fill(hp, 0, 4 * MB, seed_of(11, hp));

	/* Private file mapping: pages 1,4,7.. COW'd, 2,5,.. only read, rest untouched. */
	fd = make_file(priv_path, PRIV_LEN, PRIV_SEED);
	priv = mmap(NULL, PRIV_LEN, RW, MAP_PRIVATE, fd, 0);
	if (priv == MAP_FAILED)
		fail("mmap %s: %m", priv_path);
	close(fd);
	for (size_t off = 0; off < PRIV_LEN; off += 4096)
		if (off / 4096 % 3 == 1)
			fill(priv, off, 4096, COW_SEED);
		else if (off / 4096 % 3 == 2)
			sink += priv[off];

	/* Shared file mapping; page 2 rewritten through the mapping. */
	fd = make_file(shared_path, SH_LEN, SH_SEED);
	shf = mmap(NULL, SH_LEN, RW, MAP_SHARED, fd, 0);
	if (shf == MAP_FAILED)
		fail("mmap %s: %m", shared_path);
	close(fd);
	fill(shf, 2 * 4096, 4096, SH_SEED2);

	/* mremap: grow 64K -> 256K and force a move onto a reserved range. */
	mr_old = map(64 * KB, RW, P);
	fill(mr_old, 0, 64 * KB, seed_of(12, mr_old));
	mr = map(256 * KB, PROT_NONE, P);
	mr = mremap(mr_old, 64 * KB, 256 * KB, MREMAP_MAYMOVE | MREMAP_FIXED, mr);
	if (mr == MAP_FAILED || mr == mr_old)
		fail("mremap did not move: %m");
	fill(mr, 64 * KB, 192 * KB, seed_of(13, mr));

	check_vma("hugepage area (before READY)", hp, "rw-p", NULL, 1);
	test_ready();
	test_waitsig();

	check(    "1-page anon", a1, 0, pg, seed_of(1, a1));
	check(    "64K anon", a64, 0, 64 * KB, seed_of(2, a64));
	for (size_t off = 0; off < 8 * MB; off += pg)
		if (off / pg % 3 == 0)
			check("8M anon touched page", a8m, off, pg, seed_of(3, a8m));
		else
			check_zero("8M anon untouched page", a8m, off, pg);
	check_zero("never-touched anon", untouched, 0, 1 * MB);
	check_zero("read-only-touched anon", zero, 0, 256 * KB);
	check(    "shared anon", shanon, 0, 128 * KB, seed_of(4, shanon));
	check(    "shared anon ro", shro, 0, 64 * KB, seed_of(14, shro));
	check(    "read-only anon", ro, 0, 64 * KB, seed_of(5, ro));
	for (int i = 0; i < NSMALL; i++)
		checkb("small malloc block", small[i], 1 + (size_t)i * 37 % 200,
		       seed_of(7, small[i]));
	for (int i = 0; i < NLARGE; i++)
		checkb("large malloc block", large[i], MB + (size_t)i * 4096,
		       seed_of(8, large[i]));
	checkb(   "sbrk area", brk0, 256 * KB, seed_of(9, brk0));
	check(    "stack array", stackbuf, 0, sizeof(stackbuf), seed_of(10, stackbuf));
	check(    "hugepage area", hp, 0, 4 * MB, seed_of(11, hp));
	for (size_t off = 0; off < PRIV_LEN; off += 4096)
		check(off / 4096 % 3 == 1 ? "private file COW page" : "private file page",
		      priv, off, 4096, off / 4096 % 3 == 1 ? COW_SEED : PRIV_SEED);
	check_file(priv_path, PRIV_LEN, PRIV_SEED);	/* COW must not reach the file */
	check(    "mremap old part", mr, 0, 64 * KB, seed_of(12, mr_old));
	check(    "mremap grown part", mr, 64 * KB, 192 * KB, seed_of(13, mr));
	for (size_t off = 0; off < SH_LEN; off += 4096)
		check("shared file page", shf, off, 4096, off == 8192 ? SH_SEED2 : SH_SEED);

	check_vma("1-page anon", a1, "rw-p", NULL, 0);
	check_vma("8M anon", a8m, "rw-p", NULL, 0);
	check_vma("never-touched anon", untouched, "rw-p", NULL, 0);
	check_vma("shared anon", shanon, "rw-s", NULL, 0);
	check_vma("shared anon ro", shro, "r--s", NULL, 0);
	check_vma("read-only anon", ro, "r--p", NULL, 0);
	check_vma("PROT_NONE anon", none, "---p", NULL, 0);
	check_vma("sbrk area", brk0, "rw-p", "[heap]", 0);
	check_vma("stack array", stackbuf, "rw-p", "[stack]", 0);
	check_vma("hugepage area", hp, "rw-p", NULL, 1);
	check_vma("private file map", priv, "rw-p", priv_path, 0);
	check_vma("shared file map", shf, "rw-s", shared_path, 0);
	check_vma("mremap area", mr, "rw-p", NULL, 0);

	if (mprotect(none, 64 * KB, PROT_READ))
		fail("mprotect PROT_NONE area back to read: %m");
	check("PROT_NONE anon (re-enabled)", none, 0, 64 * KB, seed_of(6, none));

	/* The shared mapping must still be the real file: write, msync, read(2). */
	fill(shf, 0, SH_LEN, SH_SEED3);
	if (msync(shf, SH_LEN, MS_SYNC))
		fail("msync shared file map: %m");
	check_file(shared_path, SH_LEN, SH_SEED3);

	(void)sink;
	pass();	/* exit() runs cleanup() */
}
