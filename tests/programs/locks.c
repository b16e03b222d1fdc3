/*
 * locks: file locks held across dump/restore.
 *   fd 10  flock(LOCK_EX) on locks.a, also dup'ed at fd 11 (one description)
 *   fd 12  flock(LOCK_SH) on locks.b
 *   fd 13  POSIX read lock on locks.c bytes 5..14, write lock 100..EOF
 *   fd 14  OFD write lock on locks.d bytes 0..9
 * After SIGTERM a forked child tries to take conflicting locks (each must
 * fail with EWOULDBLOCK/EAGAIN; a shared flock on locks.b must succeed),
 * and F_GETLK in the child names this process as the POSIX lock holder.
 */
#define _GNU_SOURCE
#include "lib.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <unistd.h>

static int open_at(const char *path, int at)
{
	int fd = open(path, O_RDWR | O_CREAT, 0600);

	if (fd < 0 || dup2(fd, at) != at)
		fail("open %s", path);
	close(fd);
	return at;
}

static void lock_range(int fd, int cmd, short type, off_t start, off_t len)
{
	struct flock fl = {.l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len};

	if (fcntl(fd, cmd, &fl))
		fail("fcntl lock %d: %s", fd, strerror(errno));
}

/* In the child: 0 if a conflicting lock is refused as it should be. */
static const char *probe(pid_t parent)
{
	struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 7, .l_len = 1};
	int a = open("locks.a", O_RDWR), b = open("locks.b", O_RDWR);
	int c = open("locks.c", O_RDWR), d = open("locks.d", O_RDWR);

	if (flock(a, LOCK_EX | LOCK_NB) == 0 || errno != EWOULDBLOCK)
		return "flock on locks.a was free";
	if (flock(b, LOCK_EX | LOCK_NB) == 0 || errno != EWOULDBLOCK)
		return "exclusive flock on locks.b was free";
	if (flock(b, LOCK_SH | LOCK_NB))
		return "shared flock on locks.b refused";
	if (fcntl(c, F_GETLK, &fl) || fl.l_type != F_RDLCK || fl.l_pid != parent ||
	    fl.l_start != 5 || fl.l_len != 10)
		return "F_GETLK on locks.c byte 7 does not show the read lock";
	fl = (struct flock){.l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = 7, .l_len = 1};
	if (fcntl(c, F_SETLK, &fl))
		return "a read lock on locks.c byte 7 was refused";
	fl = (struct flock){.l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = 5000, .l_len = 1};
	if (fcntl(c, F_SETLK, &fl) == 0 || (errno != EAGAIN && errno != EACCES))
		return "locks.c byte 5000 was not write-locked";
	fl = (struct flock){.l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = 50, .l_len = 10};
	if (fcntl(c, F_SETLK, &fl))
		return "locks.c bytes 50..59 were locked";
	fl = (struct flock){.l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = 3, .l_len = 1};
	if (fcntl(d, F_OFD_SETLK, &fl) == 0 || errno != EAGAIN)
		return "locks.d byte 3 was not OFD-locked";
	return NULL;
}

int main(int argc, char **argv)
{
	int a, b, c, d, p[2], st;
	pid_t child;
	char why[128] = "";

	test_init(argc, argv);
	a = open_at("locks.a", 10);
	dup2(a, 11);
	b = open_at("locks.b", 12);
	c = open_at("locks.c", 13);
	d = open_at("locks.d", 14);
	if (flock(a, LOCK_EX) || flock(b, LOCK_SH))
		fail("flock");
	lock_range(c, F_SETLK, F_RDLCK, 5, 10);
	lock_range(c, F_SETLK, F_WRLCK, 100, 0);
	lock_range(d, F_OFD_SETLK, F_WRLCK, 0, 10);

	test_ready();
	test_waitsig();

	if (pipe(p))
		fail("pipe");
	child = fork();
	if (child == 0) {
		const char *r = probe(getppid());

		if (r && write(p[1], r, strlen(r)) < 0)
			_exit(2);
		_exit(r ? 1 : 0);
	}
	close(p[1]);
	if (read(p[0], why, sizeof(why) - 1) < 0)
		why[0] = 0;
	if (waitpid(child, &st, 0) != child || !WIFEXITED(st) || WEXITSTATUS(st))
		fail("locks lost: %s", why[0] ? why : "the probe failed");
	pass();
}
