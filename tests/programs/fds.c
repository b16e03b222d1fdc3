/*
 * fds: regular files and char devices at odd fd numbers, with offsets,
 * access modes, O_APPEND/O_NONBLOCK and FD_CLOEXEC, across dumps; every other
 * fd number (up to 65535) must keep its open/closed state.
 * Files live in /tmp/fds.XXXXXX (removed at exit).  Needs RLIMIT_NOFILE
 * > 1000 (the soft limit is raised up to the hard limit if necessary).
 */
#define _GNU_SOURCE
#include "lib.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

enum { FD_A = 7, FD_B = 42, FD_C = 200, FD_D = 1000, FD_NULL = 13, FD_ZERO = 300 };
static const int fds[] = { FD_A, FD_B, FD_C, FD_D, FD_NULL, FD_ZERO };
#define NFDS (int)(sizeof(fds) / sizeof(fds[0]))

#define MAXFD 65536
static unsigned char open0[MAXFD];	/* which fds were open before READY */
static char dir[] = "/tmp/fds.XXXXXX";
static char path_a[64], path_b[64], path_c[64], path_d[64];
static const char d_data[] = "nonblocking-file-data\n";

static unsigned char pat_a(long i) { return (unsigned char)(i * 7 + 3); }
static unsigned char pat_c(long i) { return (unsigned char)(i * 13 + 5); }

static void cleanup(void)
{
	unlink(path_a); unlink(path_b); unlink(path_c); unlink(path_d);
	rmdir(dir);
}

static void write_file(const char *path, const void *buf, size_t len)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);

	if (fd < 0 || write(fd, buf, len) != (ssize_t)len || close(fd))
		fail("create %s: %m", path);
}

/* open() then move to exactly fd number `at`, closing the original. */
static void open_at(const char *path, int flags, int at)
{
	int fd = open(path, flags, 0600);

	if (fd < 0)
		fail("open %s: %m", path);
	if (dup2(fd, at) != at)
		fail("dup2(%d, %d): %m", fd, at);
	close(fd);
}

static void expect_pos(int fd, off_t want)
{
	off_t got = lseek(fd, 0, SEEK_CUR);

	if (got != want)
		fail("fd %d offset %lld, expected %lld", fd, (long long)got, (long long)want);
}

static void expect_fl(int fd, int accmode, int flag, const char *flagname)
{
	int fl = fcntl(fd, F_GETFL);

	if (fl < 0)
		fail("fd %d: F_GETFL: %m", fd);
	if ((fl & O_ACCMODE) != accmode)
		fail("fd %d access mode %d, expected %d", fd, fl & O_ACCMODE, accmode);
	if (flag && !(fl & flag))
		fail("fd %d lost %s (flags %#o)", fd, flagname, fl);
}

static void expect_read(int fd, const unsigned char *want, size_t len)
{
	unsigned char buf[256];
	ssize_t n = read(fd, buf, len);

	if (n != (ssize_t)len)
		fail("fd %d: read %zu bytes returned %zd (%m)", fd, len, n);
	for (size_t i = 0; i < len; i++)
		if (buf[i] != want[i])
			fail("fd %d: byte %zu read %#x, expected %#x", fd, i, buf[i], want[i]);
}

int main(int argc, char **argv)
{
	unsigned char buf[8192], want[256];
	struct stat st0[NFDS], st;
	int fl0[NFDS], fd, n, maxfd;
	struct rlimit rl;
	char text[64];

	test_init(argc, argv);
	getrlimit(RLIMIT_NOFILE, &rl);
	if (rl.rlim_cur <= FD_D) {
		rl.rlim_cur = rl.rlim_max > 2048 ? 2048 : rl.rlim_max;
		if (rl.rlim_cur <= FD_D || setrlimit(RLIMIT_NOFILE, &rl))
			fail("need RLIMIT_NOFILE > %d (hard limit %lu)", FD_D,
			     (unsigned long)rl.rlim_max);
	}
	if (!mkdtemp(dir))
		fail("mkdtemp: %m");
	snprintf(path_a, sizeof(path_a), "%s/a.dat", dir);
	snprintf(path_b, sizeof(path_b), "%s/b.log", dir);
	snprintf(path_c, sizeof(path_c), "%s/c.dat", dir);
	snprintf(path_d, sizeof(path_d), "%s/d.dat", dir);
	atexit(cleanup);

	for (int i = 0; i < 8192; i++)
		buf[i] = pat_a(i);
	write_file(path_a, buf, 8192);
	for (int i = 0; i < 4096; i++)
		buf[i] = pat_c(i);
	write_file(path_c, buf, 4096);
	write_file(path_d, d_data, strlen(d_data));
	write_file(path_b, "", 0);

	open_at(path_a, O_RDONLY, FD_A);			/* offset mid-file */
	lseek(FD_A, 1000, SEEK_SET);
	open_at(path_b, O_WRONLY | O_APPEND, FD_B);
	if (write(FD_B, "first\n", 6) != 6)
		fail("write b.log: %m");
	/* Grow b.log behind FD_B's back: its offset stays 6, appends go to 12. */
	fd = open(path_b, O_WRONLY | O_APPEND);
	if (fd < 0 || write(fd, "other\n", 6) != 6)
		fail("second writer b.log: %m");
	close(fd);
	open_at(path_c, O_RDWR, FD_C);
	lseek(FD_C, 2048, SEEK_SET);
	fcntl(FD_C, F_SETFD, FD_CLOEXEC);
	open_at(path_d, O_RDONLY | O_NONBLOCK, FD_D);
	if (read(FD_D, buf, 5) != 5)
		fail("read d.dat: %m");
	open_at("/dev/null", O_RDWR, FD_NULL);
	open_at("/dev/zero", O_RDONLY, FD_ZERO);
	fcntl(FD_ZERO, F_SETFD, FD_CLOEXEC);
	/* An fd that was opened and closed again must stay closed. */
	open_at("/dev/null", O_RDONLY, 50);
	close(50);

	getrlimit(RLIMIT_NOFILE, &rl);
	maxfd = rl.rlim_cur < MAXFD ? (int)rl.rlim_cur : MAXFD;
	for (fd = 0; fd < maxfd; fd++)
		open0[fd] = fcntl(fd, F_GETFD) >= 0;
	for (int i = 0; i < 3; i++)
		if (!open0[i])
			fail("fd %d (stdin/stdout/stderr) is not open", i);
	for (int i = 0; i < NFDS; i++) {
		fstat(fds[i], &st0[i]);
		fl0[i] = fcntl(fds[i], F_GETFL);
	}

	test_ready();
	test_waitsig();

	/* Every fd keeps its open/closed state (the closed originals, fd 50). */
	for (fd = 0; fd < maxfd; fd++) {
		int now = fcntl(fd, F_GETFD) >= 0;

		if (!now && errno != EBADF)
			fail("fd %d: F_GETFD errno %d, expected EBADF", fd, errno);
		if (now != open0[fd])
			fail("fd %d is %s after restore but was %s before READY", fd,
			     now ? "open" : "closed", open0[fd] ? "open" : "closed");
	}
	for (int i = 0; i < NFDS; i++) {
		int cloexec = fds[i] == FD_C || fds[i] == FD_ZERO;

		if (fcntl(fds[i], F_GETFD) != (cloexec ? FD_CLOEXEC : 0))
			fail("fd %d: FD_CLOEXEC is %d, expected %d", fds[i],
			     fcntl(fds[i], F_GETFD), cloexec);
		if (fcntl(fds[i], F_GETFL) != fl0[i])
			fail("fd %d: F_GETFL %#o, expected %#o", fds[i],
			     fcntl(fds[i], F_GETFL), fl0[i]);
		fstat(fds[i], &st);
		if (st.st_ino != st0[i].st_ino || st.st_dev != st0[i].st_dev ||
		    st.st_rdev != st0[i].st_rdev)
			fail("fd %d: now dev/ino/rdev %#lx/%lu/%#lx, expected %#lx/%lu/%#lx",
			     fds[i], (unsigned long)st.st_dev, (unsigned long)st.st_ino,
			     (unsigned long)st.st_rdev, (unsigned long)st0[i].st_dev,
			     (unsigned long)st0[i].st_ino, (unsigned long)st0[i].st_rdev);
	}

	/* a.dat: read-only at offset 1000. */
	expect_fl(FD_A, O_RDONLY, 0, "");
	expect_pos(FD_A, 1000);
	for (int i = 0; i < 100; i++)
		want[i] = pat_a(1000 + i);
	expect_read(FD_A, want, 100);
	expect_pos(FD_A, 1100);

	/* b.log: O_APPEND; offset 6 but the write must land at the end (12). */
	expect_fl(FD_B, O_WRONLY, O_APPEND, "O_APPEND");
	expect_pos(FD_B, 6);
	if (write(FD_B, "second\n", 7) != 7)
		fail("write to fd %d (b.log): %m", FD_B);
	fd = open(path_b, O_RDONLY);
	n = (int)read(fd, text, sizeof(text) - 1);
	close(fd);
	text[n < 0 ? 0 : n] = '\0';
	if (strcmp(text, "first\nother\nsecond\n"))
		fail("b.log content '%s', expected 'first\\nother\\nsecond\\n'", text);

	/* c.dat: read-write at offset 2048, FD_CLOEXEC. */
	expect_fl(FD_C, O_RDWR, 0, "");
	expect_pos(FD_C, 2048);
	if (write(FD_C, "XYZ", 3) != 3)
		fail("write to fd %d (c.dat): %m", FD_C);
	for (int i = 0; i < 10; i++)
		want[i] = pat_c(2051 + i);
	expect_read(FD_C, want, 10);
	if (pread(FD_C, text, 3, 2048) != 3 || memcmp(text, "XYZ", 3))
		fail("c.dat: write did not land at offset 2048");

	/* d.dat: O_RDONLY|O_NONBLOCK at offset 5. */
	expect_fl(FD_D, O_RDONLY, O_NONBLOCK, "O_NONBLOCK");
	expect_pos(FD_D, 5);
	expect_read(FD_D, (const unsigned char *)d_data + 5, strlen(d_data) - 5);

	/* Char devices: right device numbers and behaviour. */
	if (!S_ISCHR(st0[4].st_mode) || st0[4].st_rdev != makedev(1, 3))
		fail("fd %d is not /dev/null before READY", FD_NULL);
	expect_fl(FD_NULL, O_RDWR, 0, "");
	if (write(FD_NULL, "x", 1) != 1 || read(FD_NULL, buf, 1) != 0)
		fail("fd %d does not behave like /dev/null", FD_NULL);
	if (st0[5].st_rdev != makedev(1, 5))
		fail("fd %d is not /dev/zero before READY", FD_ZERO);
	memset(buf, 0xff, 4096);
	if (read(FD_ZERO, buf, 4096) != 4096)
		fail("read /dev/zero fd %d: %m", FD_ZERO);
	for (int i = 0; i < 4096; i++)
		if (buf[i])
			fail("fd %d (/dev/zero) byte %d is %#x", FD_ZERO, i, buf[i]);
	pass();
}
