/*
 * inotify: an inotify instance (fd 50) with watches wd 1 ($PWD/in.d1,
 * IN_CREATE|IN_DELETE), wd 2 ($PWD/in.f, IN_MODIFY), wd 4 ($PWD/in.d3,
 * IN_CREATE|IN_ONLYDIR); wd 3 (on $PWD/in.d2) was removed before READY.
 * After SIGTERM: each watch reports its events under its wd, in.d2 reports
 * nothing, watching in.d1 again gives wd 1, a new watch gets wd 5.
 */
#define _GNU_SOURCE
#include "lib.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

static char cwd[256];

static const char *at(const char *name)
{
	static char buf[4][512];
	static int i;

	i = (i + 1) % 4;
	snprintf(buf[i], sizeof(buf[i]), "%s/%s", cwd, name);
	return buf[i];
}

/* Read one event (waiting up to 2 s); its wd and mask. */
static int next_event(int fd, uint32_t *mask, char *name, size_t namelen)
{
	char buf[4096] __attribute__((aligned(8)));
	struct pollfd p = {.fd = fd, .events = POLLIN};
	struct inotify_event *ev;
	ssize_t n;

	if (poll(&p, 1, 2000) != 1)
		return -1;
	n = read(fd, buf, sizeof(struct inotify_event) + NAME_MAX + 1);
	if (n < (ssize_t)sizeof(*ev))
		fail("read inotify: %zd", n);
	ev = (struct inotify_event *)buf;
	*mask = ev->mask;
	snprintf(name, namelen, "%s", ev->len ? ev->name : "");
	return ev->wd;
}

static void expect(int fd, int wd, uint32_t bit, const char *name)
{
	uint32_t mask;
	char got[NAME_MAX + 1];
	int w = next_event(fd, &mask, got, sizeof(got));

	if (w != wd || !(mask & bit) || strcmp(got, name))
		fail("expected event wd %d mask %#x '%s', got wd %d mask %#x '%s'", wd, bit, name,
		     w, w < 0 ? 0 : mask, w < 0 ? "" : got);
}

int main(int argc, char **argv)
{
	int fd, wd, f;
	uint32_t mask;
	char name[NAME_MAX + 1];

	test_init(argc, argv);
	if (!getcwd(cwd, sizeof(cwd)))
		fail("getcwd");
	mkdir(at("in.d1"), 0700);
	mkdir(at("in.d2"), 0700);
	mkdir(at("in.d3"), 0700);
	f = open(at("in.f"), O_WRONLY | O_CREAT | O_TRUNC, 0600);
	close(f);
	fd = inotify_init();
	if (fd < 0 || dup2(fd, 50) != 50)
		fail("inotify_init");
	close(fd);
	fd = 50;
	if (inotify_add_watch(fd, at("in.d1"), IN_CREATE | IN_DELETE) != 1 ||
	    inotify_add_watch(fd, at("in.f"), IN_MODIFY) != 2 ||
	    inotify_add_watch(fd, at("in.d2"), IN_CREATE) != 3 ||
	    inotify_add_watch(fd, at("in.d3"), IN_CREATE | IN_ONLYDIR) != 4)
		fail("inotify_add_watch");
	if (inotify_rm_watch(fd, 3))
		fail("inotify_rm_watch");
	if (next_event(fd, &mask, name, sizeof(name)) != 3 || !(mask & IN_IGNORED))
		fail("no IN_IGNORED for wd 3");

	test_ready();
	test_waitsig();

	f = open(at("in.d1/new"), O_WRONLY | O_CREAT, 0600);
	close(f);
	expect(fd, 1, IN_CREATE, "new");
	f = open(at("in.f"), O_WRONLY);
	if (write(f, "x", 1) != 1)
		fail("write in.f");
	close(f);
	expect(fd, 2, IN_MODIFY, "");
	f = open(at("in.d2/quiet"), O_WRONLY | O_CREAT, 0600);
	close(f);
	f = open(at("in.d3/other"), O_WRONLY | O_CREAT, 0600);
	close(f);
	expect(fd, 4, IN_CREATE, "other");    /* nothing came from in.d2 first */
	unlink(at("in.d1/new"));
	expect(fd, 1, IN_DELETE, "new");
	if ((wd = inotify_add_watch(fd, at("in.d1"), IN_CREATE | IN_DELETE)) != 1)
		fail("watching in.d1 again gave wd %d", wd);
	if ((wd = inotify_add_watch(fd, at("in.d2"), IN_CREATE)) != 5)
		fail("a new watch got wd %d, expected 5", wd);
	unlink(at("in.d2/quiet"));
	unlink(at("in.d3/other"));
	pass();
}
