/*
 * fanotify: a fanotify group (fd 55, FAN_CLASS_NOTIF) with an inode mark on
 * $PWD (FAN_CLOSE_WRITE | FAN_EVENT_ON_CHILD) and a mount mark on $PWD's
 * mount (FAN_OPEN), an ignored mask on $PWD/fan.quiet (FAN_CLOSE_WRITE).
 * After SIGTERM: the marks are back (fdinfo shows them), writing
 * $PWD/fan.new reports FAN_CLOSE_WRITE for that file, writing fan.quiet
 * does not.
 */
#define _GNU_SOURCE
#include "lib.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fanotify.h>
#include <unistd.h>

static char cwd[256];

/* Read events for up to 2 s; 1 if one with `want` in its mask named `path`. */
static int saw(int fd, uint64_t want, const char *path)
{
	char buf[8192] __attribute__((aligned(8)));
	struct pollfd p = {.fd = fd, .events = POLLIN};

	while (poll(&p, 1, 2000) == 1) {
		ssize_t n = read(fd, buf, sizeof(buf));
		struct fanotify_event_metadata *m = (void *)buf;
		int found = 0;

		if (n <= 0)
			return 0;
		for (; FAN_EVENT_OK(m, n); m = FAN_EVENT_NEXT(m, n)) {
			char link[64], got[PATH_MAX];
			ssize_t k;

			if (m->fd < 0)
				continue;
			snprintf(link, sizeof(link), "/proc/self/fd/%d", m->fd);
			k = readlink(link, got, sizeof(got) - 1);
			if (k > 0) {
				got[k] = 0;
				if ((m->mask & want) && !strcmp(got, path))
					found = 1;
			}
			close(m->fd);
		}
		if (found)
			return 1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	char path[512], quiet[512];
	int fd, f;

	test_init(argc, argv);
	if (!getcwd(cwd, sizeof(cwd)))
		fail("getcwd");
	snprintf(path, sizeof(path), "%s/fan.new", cwd);
	snprintf(quiet, sizeof(quiet), "%s/fan.quiet", cwd);
	f = open(quiet, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	close(f);
	fd = fanotify_init(FAN_CLASS_NOTIF | FAN_NONBLOCK, O_RDONLY);
	if (fd < 0 || dup2(fd, 55) != 55)
		fail("fanotify_init: %s", strerror(errno));
	close(fd);
	fd = 55;
	if (fanotify_mark(fd, FAN_MARK_ADD, FAN_CLOSE_WRITE | FAN_EVENT_ON_CHILD, AT_FDCWD, cwd) ||
	    fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_MOUNT, FAN_OPEN, AT_FDCWD, cwd) ||
	    fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_IGNORED_MASK | FAN_MARK_IGNORED_SURV_MODIFY,
			  FAN_CLOSE_WRITE, AT_FDCWD, quiet))
		fail("fanotify_mark: %s", strerror(errno));

	test_ready();
	test_waitsig();

	{
		char info[4096];
		int i = open("/proc/self/fdinfo/55", O_RDONLY);
		ssize_t n = i < 0 ? -1 : read(i, info, sizeof(info) - 1);

		if (n <= 0)
			fail("fdinfo 55");
		info[n] = 0;
		if (!strstr(info, "fanotify mnt_id:") || !strstr(info, " mask:8000008") ||
		    !strstr(info, " mask:20") || !strstr(info, "mflags:40") ||
		    !strstr(info, "ignored_mask:8"))
			fail("the marks are not all back:\n%s", info);
		close(i);
	}
	f = open(quiet, O_WRONLY);
	if (f < 0 || write(f, "q", 1) != 1)
		fail("write quiet");
	close(f);
	f = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	if (f < 0 || write(f, "x", 1) != 1)
		fail("write new");
	close(f);
	if (!saw(fd, FAN_CLOSE_WRITE, path))
		fail("no FAN_CLOSE_WRITE for %s", path);
	unlink(path);
	pass();
}
