/*
 * oddfiles: files that are not plain open paths.
 *   fds 40/41  a FIFO ($PWD/odd.fifo): read end (O_NONBLOCK) and write end,
 *              "fifo-data" in flight
 *   fd 42      the FIFO $PWD/odd.fifo2 opened O_RDWR, "rdwr" in flight
 *   fds 43/44  an unlinked file (two descriptions, offsets 6 and 2), fd 45
 *              a dup of 43
 *   fd 46      a memfd "odd-memfd" with 10000 bytes, sealed SHRINK|GROW, and
 *              a shared mapping of it
 *   fd 47      O_PATH of /etc; fd 48 O_APPEND of $PWD/odd.append
 *   fds 51/52  a pipe whose read end has O_ASYNC, this process as owner and
 *              SIGRTMIN+2 as its signal (F_SETOWN, F_SETSIG)
 *   fd 53      /proc/self/stat (a file of this very process)
 * After SIGTERM: every one as it was (data, offsets, sharing, seals, the
 * mapping and the fd showing the same memory, flags), and still working.
 */
#define _GNU_SOURCE
#include "lib.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define MEMFD_SIZE 10000

static void place(int fd, int at)
{
	if (fd < 0 || dup2(fd, at) != at)
		fail("fd for %d: %s", at, strerror(errno));
	close(fd);
}

static void expect(int fd, const char *want)
{
	char buf[64];
	ssize_t n = read(fd, buf, sizeof(buf));

	if (n != (ssize_t)strlen(want) || memcmp(buf, want, n))
		fail("fd %d: read %zd bytes '%.*s', expected '%s'", fd, n, (int)(n > 0 ? n : 0),
		     buf, want);
}

static unsigned char pat(int i) { return (unsigned char)(i * 13 + 5); }

int main(int argc, char **argv)
{
	unsigned char *map, buf[MEMFD_SIZE];
	struct stat st, st2;
	int fd;

	test_init(argc, argv);
	unlink("odd.fifo");
	unlink("odd.fifo2");
	if (mkfifo("odd.fifo", 0640) || mkfifo("odd.fifo2", 0600))
		fail("mkfifo");
	place(open("odd.fifo", O_RDONLY | O_NONBLOCK), 40);
	place(open("odd.fifo", O_WRONLY), 41);
	if (write(41, "fifo-data", 9) != 9)
		fail("write fifo");
	place(open("odd.fifo2", O_RDWR), 42);
	if (write(42, "rdwr", 4) != 4)
		fail("write fifo2");

	place(open("odd.tmp", O_RDWR | O_CREAT | O_TRUNC, 0604), 43);
	if (write(43, "ghost-content-12345", 19) != 19)
		fail("write ghost");
	place(open("odd.tmp", O_RDONLY), 44);
	dup2(43, 45);
	if (unlink("odd.tmp"))
		fail("unlink");
	lseek(43, 6, SEEK_SET);
	lseek(44, 2, SEEK_SET);

	place(memfd_create("odd-memfd", MFD_ALLOW_SEALING), 46);
	for (int i = 0; i < MEMFD_SIZE; i++)
		buf[i] = pat(i);
	if (write(46, buf, MEMFD_SIZE) != MEMFD_SIZE ||
	    fcntl(46, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW))
		fail("memfd");
	map = mmap(NULL, MEMFD_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, 46, 0);
	if (map == MAP_FAILED)
		fail("mmap memfd");
	lseek(46, 100, SEEK_SET);

	place(open("/etc", O_PATH), 47);
	place(open("odd.append", O_WRONLY | O_CREAT | O_APPEND | O_TRUNC, 0600), 48);

	{
		int p[2];

		if (pipe(p) || dup2(p[0], 51) < 0 || dup2(p[1], 52) < 0)
			fail("pipe 51/52");
		close(p[0]);
		close(p[1]);
		if (fcntl(51, F_SETOWN, getpid()) || fcntl(51, F_SETSIG, SIGRTMIN + 2) ||
		    fcntl(51, F_SETFL, O_ASYNC | O_NONBLOCK))
			fail("F_SETOWN/F_SETSIG");
	}

	place(open("/proc/self/stat", O_RDONLY), 53);

	test_ready();
	test_waitsig();

	/* FIFOs */
	if (fstat(40, &st) || !S_ISFIFO(st.st_mode) || stat("odd.fifo", &st2) ||
	    st.st_ino != st2.st_ino)
		fail("fd 40 is not the FIFO odd.fifo");
	if (!(fcntl(40, F_GETFL) & O_NONBLOCK) || (fcntl(41, F_GETFL) & O_ACCMODE) != O_WRONLY)
		fail("FIFO flags");
	expect(40, "fifo-data");
	if (read(40, buf, 1) != -1 || errno != EAGAIN)
		fail("FIFO should be empty");
	if (write(41, "more", 4) != 4)
		fail("write fifo after restore");
	expect(40, "more");
	expect(42, "rdwr");
	/* the unlinked file */
	if (fstat(43, &st) || st.st_nlink != 0 || (st.st_mode & 0777) != 0604 ||
	    fstat(44, &st2) || st.st_ino != st2.st_ino)
		fail("fds 43/44: not one unlinked file (nlink %lu)", (unsigned long)st.st_nlink);
	if (lseek(43, 0, SEEK_CUR) != 6 || lseek(44, 0, SEEK_CUR) != 2 ||
	    lseek(45, 0, SEEK_CUR) != 6)
		fail("unlinked file offsets");
	expect(44, "ost-content-12345");
	lseek(45, 0, SEEK_END);
	if (lseek(43, 0, SEEK_CUR) != 19)
		fail("fds 43 and 45 are not one description");
	if (pwrite(43, "G", 1, 0) != 1 || pread(44, buf, 1, 0) != 1 || buf[0] != 'G')
		fail("fds 43 and 44 are not one file");
	/* the memfd */
	if (fcntl(46, F_GET_SEALS) != (F_SEAL_SHRINK | F_SEAL_GROW))
		fail("memfd seals %#x", fcntl(46, F_GET_SEALS));
	if (lseek(46, 0, SEEK_CUR) != 100)
		fail("memfd offset");
	if (pread(46, buf, MEMFD_SIZE, 0) != MEMFD_SIZE)
		fail("memfd read");
	for (int i = 0; i < MEMFD_SIZE; i++)
		if (buf[i] != pat(i) || map[i] != pat(i))
			fail("memfd byte %d", i);
	map[5000] = 0xAB;
	if (pread(46, buf, 1, 5000) != 1 || buf[0] != 0xAB)
		fail("the mapping and the memfd are not one memory");
	if (ftruncate(46, 1) == 0 || errno != EPERM)
		fail("F_SEAL_SHRINK does not hold");
	{
		char link[128];
		ssize_t n = readlink("/proc/self/fd/46", link, sizeof(link) - 1);

		if (n < 0 || (link[n] = 0, strncmp(link, "/memfd:odd-memfd", 16)))
			fail("fd 46 is %s", n < 0 ? "?" : link);
	}
	/* O_PATH and O_APPEND */
	if (!(fcntl(47, F_GETFL) & O_PATH) || fstat(47, &st) || !S_ISDIR(st.st_mode))
		fail("fd 47 is not O_PATH of /etc");
	if (!(fcntl(48, F_GETFL) & O_APPEND))
		fail("fd 48 lost O_APPEND");
	{
		char st[64], want[32];
		ssize_t n = pread(53, st, sizeof(st) - 1, 0);

		snprintf(want, sizeof(want), "%d (", getpid());
		if (n <= 0 || (st[n] = 0, strncmp(st, want, strlen(want))))
			fail("fd 53 is not /proc/%d/stat", getpid());
	}
	/* O_ASYNC, owner and signal */
	{
		sigset_t set;
		siginfo_t si;
		struct timespec ts = {2, 0};

		if (fcntl(51, F_GETOWN) != getpid() || fcntl(51, F_GETSIG) != SIGRTMIN + 2 ||
		    !(fcntl(51, F_GETFL) & O_ASYNC))
			fail("fd 51: owner %d signal %d flags %o", fcntl(51, F_GETOWN),
			     fcntl(51, F_GETSIG), fcntl(51, F_GETFL));
		sigemptyset(&set);
		sigaddset(&set, SIGRTMIN + 2);
		sigprocmask(SIG_BLOCK, &set, NULL);
		if (write(52, "s", 1) != 1)
			fail("write 52");
		if (sigtimedwait(&set, &si, &ts) != SIGRTMIN + 2 || si.si_fd != 51)
			fail("no SIGRTMIN+2 for fd 51 after a write");
	}
	fd = open("odd.fifo", O_RDONLY | O_NONBLOCK);
	close(fd);
	unlink("odd.fifo");
	unlink("odd.fifo2");
	pass();
}
