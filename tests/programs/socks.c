/*
 * socks: unix socketpairs with both ends in the process.
 *   stream pair at 30/31: "ping" queued for 30, "pong!" queued for 31,
 *     SO_PASSCRED on 30, 31 non-blocking
 *   dgram pair at 32/33: three datagrams queued for 33 ("a", "bb", 2000 bytes)
 *   seqpacket pair at 34/35: two records queued for 34
 *   stream pair at 36/37: "bye" queued for 37, then 36 shut down for writing
 * After SIGTERM: the queues message by message, the options and flags, the
 * half-close (37 reads "bye" then EOF; 36 can no longer write), and that
 * every pair still talks both ways.
 */
#define _GNU_SOURCE
#include "lib.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void pair(int type, int a, int b)
{
	int sv[2];

	if (socketpair(AF_UNIX, type, 0, sv))
		fail("socketpair");
	if (dup2(sv[0], a) < 0 || dup2(sv[1], b) < 0)
		fail("dup2");
	close(sv[0]);
	close(sv[1]);
}

static void expect(int fd, const void *want, size_t n)
{
	char buf[4096];
	ssize_t k = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);

	if (k != (ssize_t)n || memcmp(buf, want, n))
		fail("fd %d: got %zd bytes, expected %zu (errno %d)", fd, k, n, errno);
}

static void talks(int a, int b)
{
	char c;

	if (send(a, "x", 1, 0) != 1 || recv(b, &c, 1, 0) != 1 || c != 'x')
		fail("fds %d -> %d no longer connected", a, b);
	if (send(b, "y", 1, 0) != 1 || recv(a, &c, 1, 0) != 1 || c != 'y')
		fail("fds %d -> %d no longer connected", b, a);
}

int main(int argc, char **argv)
{
	static char big[2000];
	int one = 1, v = 0;
	socklen_t len = sizeof(v);
	char c;

	test_init(argc, argv);
	memset(big, 'Z', sizeof(big));
	pair(SOCK_STREAM, 30, 31);
	setsockopt(30, SOL_SOCKET, SO_PASSCRED, &one, sizeof(one));
	fcntl(31, F_SETFL, O_NONBLOCK);
	send(31, "ping", 4, 0);
	send(30, "pong!", 5, 0);
	pair(SOCK_DGRAM, 32, 33);
	send(32, "a", 1, 0);
	send(32, "bb", 2, 0);
	send(32, big, sizeof(big), 0);
	pair(SOCK_SEQPACKET, 34, 35);
	send(35, "first", 5, 0);
	send(35, "second", 6, 0);
	pair(SOCK_STREAM, 36, 37);
	send(36, "bye", 3, 0);
	shutdown(36, SHUT_WR);

	test_ready();
	test_waitsig();

	if (getsockopt(30, SOL_SOCKET, SO_PASSCRED, &v, &len) || !v)
		fail("SO_PASSCRED lost on fd 30");
	if (!(fcntl(31, F_GETFL) & O_NONBLOCK) || (fcntl(30, F_GETFL) & O_NONBLOCK))
		fail("O_NONBLOCK flags of 30/31 changed");
	expect(30, "ping", 4);
	expect(31, "pong!", 5);
	expect(33, "a", 1);
	expect(33, "bb", 2);
	expect(33, big, sizeof(big));
	expect(34, "first", 5);
	expect(34, "second", 6);
	expect(37, "bye", 3);
	if (recv(37, &c, 1, MSG_DONTWAIT) != 0)
		fail("fd 37 should read EOF after its peer's shutdown");
	if (send(36, "x", 1, MSG_NOSIGNAL) != -1 || errno != EPIPE)
		fail("fd 36 can still write after shutdown(SHUT_WR)");
	talks(30, 31);
	talks(32, 33);
	talks(34, 35);
	pass();
}
