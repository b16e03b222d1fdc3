/*
 * usocks: unix sockets beyond socketpairs.
 *   L   stream listener bound to $PWD/usocks.sock (mode 0640), backlog 5
 *   A   seqpacket listener on an abstract name with two clients (P1, P2)
 *       waiting in its queue, not accepted
 *   C1  a client connected to L and accepted (S1), data queued both ways
 *   D   datagram socket bound to $PWD/usocks.dgram, two datagrams queued
 *   U   a stream socket, neither bound nor connected
 *   G   a listener bound to $PWD/usocks.gone, then the file unlinked
 *   E   a stream end whose peer sent "bye" and closed
 * After SIGTERM: names (getsockname), the socket file's mode, the waiting
 * clients accepted and talking, the queued data, new connections to L, U
 * still usable, G's file still gone, E reads "bye" then EOF.
 */
#define _GNU_SOURCE
#include "lib.h"

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

static struct sockaddr_un addr_of(const char *path, int abstract, socklen_t *len)
{
	struct sockaddr_un a = {.sun_family = AF_UNIX};

	if (abstract) {
		a.sun_path[0] = 0;
		strncpy(a.sun_path + 1, path, sizeof(a.sun_path) - 2);
		*len = offsetof(struct sockaddr_un, sun_path) + 1 + strlen(path);
	} else {
		strncpy(a.sun_path, path, sizeof(a.sun_path) - 1);
		*len = sizeof(a);
	}
	return a;
}

static int sock_at(int type, int at)
{
	int s = socket(AF_UNIX, type, 0);

	if (s < 0 || dup2(s, at) != at)
		fail("socket for fd %d", at);
	close(s);
	return at;
}

static void bind_to(int s, const char *path, int abstract)
{
	socklen_t len;
	struct sockaddr_un a = addr_of(path, abstract, &len);

	if (bind(s, (struct sockaddr *)&a, len))
		fail("bind %s: %s", path, strerror(errno));
}

static void connect_to(int s, const char *path, int abstract)
{
	socklen_t len;
	struct sockaddr_un a = addr_of(path, abstract, &len);

	if (connect(s, (struct sockaddr *)&a, len))
		fail("connect %s: %s", path, strerror(errno));
}

static void check_name(int s, const char *path, int abstract, const char *what)
{
	struct sockaddr_un a;
	socklen_t len = sizeof(a) - 1;

	memset(&a, 0, sizeof(a));
	if (getsockname(s, (struct sockaddr *)&a, &len))
		fail("%s: getsockname", what);
	if (abstract ? (a.sun_path[0] != 0 || strcmp(a.sun_path + 1, path))
		     : strcmp(a.sun_path, path))
		fail("%s: bound to '%s', expected '%s'", what, a.sun_path + !!abstract, path);
}

static void expect(int s, const char *want, const char *what)
{
	char buf[128];
	ssize_t n = recv(s, buf, sizeof(buf), MSG_DONTWAIT);

	if (n != (ssize_t)strlen(want) || memcmp(buf, want, n))
		fail("%s: got %zd bytes '%.*s', expected '%s'", what, n, (int)(n > 0 ? n : 0),
		     buf, want);
}

int main(int argc, char **argv)
{
	char cwd[200], lpath[300], dpath[300], gpath[300], abs_name[64];
	int L, A, P1, P2, C1, S1, D, U, G, E, tmp, sv[2];
	struct stat st;

	test_init(argc, argv);
	if (!getcwd(cwd, sizeof(cwd)))
		fail("getcwd");
	snprintf(lpath, sizeof(lpath), "%s/usocks.sock", cwd);
	snprintf(dpath, sizeof(dpath), "%s/usocks.dgram", cwd);
	snprintf(gpath, sizeof(gpath), "%s/usocks.gone", cwd);
	snprintf(abs_name, sizeof(abs_name), "migrate-usocks-%d", getpid());
	unlink(lpath);
	unlink(dpath);
	unlink(gpath);

	L = sock_at(SOCK_STREAM, 30);
	bind_to(L, lpath, 0);
	if (chmod(lpath, 0640) || listen(L, 5))
		fail("chmod/listen L");
	A = sock_at(SOCK_SEQPACKET, 31);
	bind_to(A, abs_name, 1);
	if (listen(A, 4))
		fail("listen A");
	P1 = sock_at(SOCK_SEQPACKET, 32);
	connect_to(P1, abs_name, 1);
	P2 = sock_at(SOCK_SEQPACKET, 33);
	connect_to(P2, abs_name, 1);
	C1 = sock_at(SOCK_STREAM, 34);
	connect_to(C1, lpath, 0);
	S1 = accept(L, NULL, NULL);
	if (S1 < 0 || dup2(S1, 35) != 35)
		fail("accept S1");
	close(S1);
	S1 = 35;
	if (send(C1, "to-server", 9, 0) != 9 || send(S1, "to-client", 9, 0) != 9)
		fail("send C1/S1");
	D = sock_at(SOCK_DGRAM, 36);
	bind_to(D, dpath, 0);
	tmp = socket(AF_UNIX, SOCK_DGRAM, 0);
	{
		socklen_t len;
		struct sockaddr_un a = addr_of(dpath, 0, &len);

		if (sendto(tmp, "dgram-1", 7, 0, (struct sockaddr *)&a, len) != 7 ||
		    sendto(tmp, "dgram-two", 9, 0, (struct sockaddr *)&a, len) != 9)
			fail("sendto D");
	}
	close(tmp);
	U = sock_at(SOCK_STREAM, 37);
	G = sock_at(SOCK_STREAM, 38);
	bind_to(G, gpath, 0);
	if (listen(G, 1) || unlink(gpath))
		fail("G");
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv))
		fail("socketpair");
	E = 39;
	dup2(sv[0], E);
	close(sv[0]);
	if (send(sv[1], "bye", 3, 0) != 3)
		fail("send bye");
	close(sv[1]);

	test_ready();
	test_waitsig();

	/* accept4's SOCK_NONBLOCK is for the new socket: make the listeners so */
	fcntl(A, F_SETFL, O_NONBLOCK);
	fcntl(L, F_SETFL, O_NONBLOCK);
	check_name(L, lpath, 0, "L");
	if (stat(lpath, &st) || !S_ISSOCK(st.st_mode) || (st.st_mode & 0777) != 0640)
		fail("L's socket file: mode %o", st.st_mode);
	check_name(A, abs_name, 1, "A");
	check_name(D, dpath, 0, "D");
	check_name(G, gpath, 0, "G");
	if (access(gpath, F_OK) == 0)
		fail("G's unlinked socket file is back");
	expect(S1, "to-server", "S1");
	expect(C1, "to-client", "C1");
	if (send(C1, "ping", 4, 0) != 4)
		fail("C1 send");
	expect(S1, "ping", "S1 after restore");
	expect(D, "dgram-1", "D first");
	expect(D, "dgram-two", "D second");
	{
		int a1 = accept4(A, NULL, NULL, SOCK_NONBLOCK);
		int a2 = accept4(A, NULL, NULL, SOCK_NONBLOCK);

		if (a1 < 0 || a2 < 0)
			fail("A: the two waiting clients could not be accepted (%s)", strerror(errno));
		if (accept4(A, NULL, NULL, SOCK_NONBLOCK) >= 0 || errno != EAGAIN)
			fail("A: a third connection waited");
		if (send(P1, "p1", 2, 0) != 2 || send(P2, "p2", 2, 0) != 2)
			fail("P1/P2 send");
		expect(a1, "p1", "first accepted from A");
		expect(a2, "p2", "second accepted from A");
	}
	{
		int c = socket(AF_UNIX, SOCK_STREAM, 0), s;

		connect_to(c, lpath, 0);
		s = accept4(L, NULL, NULL, SOCK_NONBLOCK);
		if (s < 0 || send(c, "new", 3, 0) != 3)
			fail("a new connection to L");
		expect(s, "new", "new connection to L");
		connect_to(U, lpath, 0);
		if (accept4(L, NULL, NULL, SOCK_NONBLOCK) < 0)
			fail("U could not connect to L");
	}
	expect(E, "bye", "E");
	{
		char c;

		if (recv(E, &c, 1, MSG_DONTWAIT) != 0)
			fail("E: no EOF after bye");
	}
	unlink(lpath);
	unlink(dpath);
	pass();
}
