/*
 * pipes: pipes with both ends in the process, data in flight, sizes, flags.
 *   p1: "hello, pipe" in flight, ends at fds 40/41
 *   p2: pipe size raised to 256 KiB, 100000 bytes of a pattern in flight,
 *       read end O_NONBLOCK, ends at 300/301, the write end also dup'ed at 302
 *   p3: empty, read end O_NONBLOCK (read gives EAGAIN), ends at 7/8
 * After SIGTERM: every fd number, access mode, O_NONBLOCK, pipe size, the
 * data in flight byte for byte, that 301 and 302 are one open file
 * description (sharing O_NONBLOCK), and that each write end still feeds
 * its read end.
 */
#define _GNU_SOURCE
#include "lib.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define BIG 100000

static unsigned char pattern(size_t i) { return (unsigned char)(i * 131 + 7); }

static void place(int fds[2], int r, int w)
{
	if (dup2(fds[0], r) < 0 || dup2(fds[1], w) < 0)
		fail("dup2 to %d/%d", r, w);
	close(fds[0]);
	close(fds[1]);
}

static void check_end(int fd, int accmode, int nonblock)
{
	int fl = fcntl(fd, F_GETFL);

	if (fl < 0)
		fail("fd %d is closed", fd);
	if ((fl & O_ACCMODE) != accmode)
		fail("fd %d access mode %o, expected %o", fd, fl & O_ACCMODE, accmode);
	if (!!(fl & O_NONBLOCK) != nonblock)
		fail("fd %d O_NONBLOCK is %d, expected %d", fd, !!(fl & O_NONBLOCK), nonblock);
}

static void read_exact(int fd, unsigned char *buf, size_t n)
{
	size_t got = 0;

	while (got < n) {
		ssize_t k = read(fd, buf + got, n - got);

		if (k <= 0)
			fail("fd %d: read gave %zd after %zu of %zu bytes (errno %d)", fd, k, got, n, errno);
		got += k;
	}
}

int main(int argc, char **argv)
{
	static unsigned char big[BIG], got[BIG];
	int p[2];
	char buf[64];
	ssize_t n;

	test_init(argc, argv);
	for (size_t i = 0; i < BIG; i++)
		big[i] = pattern(i);

	if (pipe(p))
		fail("pipe");
	place(p, 40, 41);
	if (write(41, "hello, pipe", 11) != 11)
		fail("write p1");

	if (pipe(p))
		fail("pipe");
	place(p, 300, 301);
	if (fcntl(301, F_SETPIPE_SZ, 256 * 1024) < 0)
		fail("F_SETPIPE_SZ");
	if (write(301, big, BIG) != BIG)
		fail("write p2");
	fcntl(300, F_SETFL, O_NONBLOCK);
	dup2(301, 302);

	if (pipe(p))
		fail("pipe");
	place(p, 7, 8);
	fcntl(7, F_SETFL, O_NONBLOCK);

	test_ready();
	test_waitsig();

	check_end(40, O_RDONLY, 0);
	check_end(41, O_WRONLY, 0);
	check_end(300, O_RDONLY, 1);
	check_end(301, O_WRONLY, 0);
	check_end(302, O_WRONLY, 0);
	check_end(7, O_RDONLY, 1);
	check_end(8, O_WRONLY, 0);
	if (fcntl(300, F_GETPIPE_SZ) != 256 * 1024)
		fail("pipe size %d, expected %d", fcntl(300, F_GETPIPE_SZ), 256 * 1024);

	n = read(40, buf, sizeof(buf));
	if (n != 11 || memcmp(buf, "hello, pipe", 11))
		fail("p1 data: %zd bytes '%.*s'", n, (int)(n > 0 ? n : 0), buf);
	read_exact(300, got, BIG);
	if (memcmp(got, big, BIG))
		fail("p2 data differs");
	if (read(300, buf, 1) != -1 || errno != EAGAIN)
		fail("p2 should be empty now (EAGAIN)");
	if (read(7, buf, 1) != -1 || errno != EAGAIN)
		fail("p3 should be empty (EAGAIN)");

	/* 301 and 302: one open file description */
	fcntl(302, F_SETFL, O_NONBLOCK);
	if (!(fcntl(301, F_GETFL) & O_NONBLOCK))
		fail("fds 301 and 302 are no longer one open file description");
	/* every write end still feeds its read end */
	if (write(41, "x", 1) != 1 || read(40, buf, 1) != 1 || buf[0] != 'x')
		fail("p1 no longer connects 41 to 40");
	if (write(302, "y", 1) != 1 || read(300, buf, 1) != 1 || buf[0] != 'y')
		fail("p2 no longer connects 302 to 300");
	if (write(8, "z", 1) != 1 || read(7, buf, 1) != 1 || buf[0] != 'z')
		fail("p3 no longer connects 8 to 7");
	pass();
}
