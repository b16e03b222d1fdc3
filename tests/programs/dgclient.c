/*
 * dgclient PATH: a datagram socket (fd 30) connected to a bound datagram
 * socket outside the dump (like a syslog client to /dev/log); sends
 * "before" at start.  After SIGTERM: getpeername is still PATH and "after"
 * reaches the server (the test reads it there).
 */
#define _GNU_SOURCE
#include "lib.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	struct sockaddr_un a = {.sun_family = AF_UNIX}, got;
	socklen_t len = sizeof(got) - 1;
	int s;

	test_init(argc, argv);
	if (argc < 2)
		fail("usage: dgclient PATH");
	strncpy(a.sun_path, argv[1], sizeof(a.sun_path) - 1);
	s = socket(AF_UNIX, SOCK_DGRAM, 0);
	if (s < 0 || dup2(s, 30) != 30)
		fail("socket");
	close(s);
	if (connect(30, (struct sockaddr *)&a, sizeof(a)) || send(30, "before", 6, 0) != 6)
		fail("connect/send: %s", strerror(errno));

	test_ready();
	test_waitsig();

	memset(&got, 0, sizeof(got));
	if (getpeername(30, (struct sockaddr *)&got, &len) || strcmp(got.sun_path, argv[1]))
		fail("getpeername: '%s'", got.sun_path);
	if (send(30, "after", 5, 0) != 5)
		fail("send after restore: %s", strerror(errno));
	pass();
}
