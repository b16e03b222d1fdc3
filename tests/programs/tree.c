/*
 * tree: a process tree with sessions, groups, zombies, a stopped child, and
 * state shared between processes.
 *
 *   R (root, the test's pid)
 *   +- B   R's group; reads a pipe R filled; shares R's open file (one
 *   |      offset), a MAP_SHARED anonymous area, a memfd mapping and a
 *   |      private area (COW from the fork) with R; a socketpair end with
 *   |      data queued both ways
 *   +- S   session leader (setsid)
 *   |  +- S1  its own group in S's session
 *   |  +- S2  in S1's group
 *   +- G   group leader in R's session
 *   |  +- G1  in G's group (inherited)
 *   +- Z1  zombie, exit(7)
 *   +- Z2  zombie, killed by SIGUSR2
 *   +- T   stopped (SIGSTOP) before the dump: must still be stopped
 *
 * Every process records its pid, ppid, pgid and sid when made and checks
 * them after SIGTERM (the parents pass SIGTERM down and check their
 * children's exit status).  R then reaps the zombies (status 7 and
 * SIGUSR2), checks T is still stopped, the shared memory both ways, the file
 * offset B moved, and the socket data.
 * `tree netlink`: B also holds a netlink socket (not supported: the dump
 * must fail and leave the whole tree as it was).
 */
#define _GNU_SOURCE
#include "lib.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/netlink.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define COW_PAGES 64
#define PAGE 4096

struct ids { pid_t pid, ppid, pgid, sid; };

static volatile uint64_t *shm;     /* MAP_SHARED|MAP_ANONYMOUS */
static volatile uint64_t *mfd;     /* memfd, MAP_SHARED */
static unsigned char *cow;         /* private, filled before the forks */
static int file_fd, pipe_r, sk, ready_r, ready_w;
static const char *who = "R";

static void record(struct ids *i)
{
	i->pid = getpid();
	i->ppid = getppid();
	i->pgid = getpgid(0);
	i->sid = getsid(0);
}

static void check_ids(const struct ids *i)
{
	struct ids now;

	record(&now);
	if (now.pid != i->pid || now.ppid != i->ppid || now.pgid != i->pgid || now.sid != i->sid)
		fail("%s: pid/ppid/pgid/sid %d/%d/%d/%d, expected %d/%d/%d/%d", who, now.pid,
		     now.ppid, now.pgid, now.sid, i->pid, i->ppid, i->pgid, i->sid);
}

static void wait_child(pid_t c, const char *name)
{
	int st;

	if (waitpid(c, &st, 0) != c)
		fail("%s: waitpid(%s %d): %s", who, name, c, strerror(errno));
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
		fail("%s: child %s (pid %d) ended with status %#x", who, name, c, st);
}

/* Tell R this process is set up: R reads the ready pipe until every
 * process has closed its end. */
static void signal_ready(void)
{
	close(ready_r);
	if (write(ready_w, "x", 1) != 1)
		fail("%s: ready pipe", who);
	close(ready_w);
}

static void check_cow(void)
{
	for (int i = 0; i < COW_PAGES * PAGE; i += 97)
		if (cow[i] != (unsigned char)(i * 7 + 1))
			fail("%s: private byte %d is %u", who, i, cow[i]);
}

/* A leaf or inner process: wait for SIGTERM, pass it down, check. */
static void live(const char *name, pid_t *kids, const char **names, int nkids)
	__attribute__((noreturn));
static void live(const char *name, pid_t *kids, const char **names, int nkids)
{
	struct ids ids;

	who = name;
	record(&ids);
	signal_ready();
	test_waitsig();
	for (int i = 0; i < nkids; i++)
		kill(kids[i], SIGTERM);
	for (int i = 0; i < nkids; i++)
		wait_child(kids[i], names[i]);
	check_ids(&ids);
	check_cow();
	_exit(0);
}

static pid_t spawn_group_member(pid_t leader, const char *name)
{
	pid_t c = fork();

	if (c < 0)
		fail("fork %s", name);
	if (c == 0) {
		if (leader && setpgid(0, leader))
			fail("%s: setpgid(0, %d): %s", name, leader, strerror(errno));
		live(name, NULL, NULL, 0);
	}
	return c;
}

static void child_B(void) __attribute__((noreturn));
static void child_B(void)
{
	struct ids ids;
	char buf[64];
	ssize_t n;

	who = "B";
	record(&ids);
	signal_ready();
	test_waitsig();
	check_ids(&ids);
	check_cow();
	n = read(pipe_r, buf, sizeof(buf));
	if (n != 9 || memcmp(buf, "R-to-B-42", 9))
		fail("B: pipe gave %zd bytes", n);
	if (shm[0] != 0x5151 || mfd[0] != 0x6161)
		fail("B: shared memory from R: %#lx %#lx", (unsigned long)shm[0],
		     (unsigned long)mfd[0]);
	shm[1] = 0xb0b0;
	mfd[1] = 0xb1b1;
	if (write(file_fd, "BBBB", 4) != 4)     /* moves the shared offset */
		fail("B: write file");
	n = recv(sk, buf, sizeof(buf), MSG_DONTWAIT);
	if (n != 6 || memcmp(buf, "R-to-H", 6))
		fail("B: socket gave %zd bytes", n);
	_exit(0);
}

int main(int argc, char **argv)
{
	struct ids ids;
	pid_t B, S, G, Z1, Z2, T;
	int p[2], sv[2], st, mfd_fd;
	char c;
	siginfo_t si;

	test_init(argc, argv);

	shm = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	mfd_fd = memfd_create("tree-shared", 0);
	if (shm == MAP_FAILED || mfd_fd < 0 || ftruncate(mfd_fd, 3 * PAGE))
		fail("shared memory set-up");
	mfd = mmap(NULL, 3 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, mfd_fd, 0);
	if (mfd == MAP_FAILED)
		fail("mmap memfd");
	close(mfd_fd);
	cow = mmap(NULL, COW_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
		   -1, 0);
	if (cow == MAP_FAILED)
		fail("mmap cow");
	for (int i = 0; i < COW_PAGES * PAGE; i++)
		cow[i] = (unsigned char)(i * 7 + 1);
	file_fd = open("tree.data", O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (file_fd < 0 || write(file_fd, "0123456789", 10) != 10)
		fail("data file");
	if (pipe(p) || socketpair(AF_UNIX, SOCK_STREAM, 0, sv))
		fail("pipe/socketpair");
	{
		int rp[2];

		if (pipe(rp))
			fail("ready pipe");
		ready_r = rp[0];
		ready_w = rp[1];
	}

	B = fork();
	if (B == 0) {
		close(p[1]);
		close(sv[0]);
		pipe_r = p[0];
		sk = sv[1];
		if (argc > 1 && !strcmp(argv[1], "netlink") &&
		    socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE) < 0)
			fail("netlink socket");
		if (send(sk, "H-to-R", 6, 0) != 6)
			fail("B: send");
		child_B();
	}
	close(p[0]);
	close(sv[1]);
	sk = sv[0];
	if (write(p[1], "R-to-B-42", 9) != 9 || send(sk, "R-to-H", 6, 0) != 6)
		fail("R: fill pipe/socket");

	S = fork();
	if (S == 0) {
		pid_t kids[2];
		const char *names[2] = {"S1", "S2"};

		if (setsid() < 0)
			fail("S: setsid");
		kids[0] = fork();
		if (kids[0] == 0) {
			setpgid(0, 0);
			live("S1", NULL, NULL, 0);
		}
		setpgid(kids[0], kids[0]);
		kids[1] = spawn_group_member(kids[0], "S2");
		live("S", kids, names, 2);
	}

	G = fork();
	if (G == 0) {
		pid_t kid;
		const char *names[1] = {"G1"};

		setpgid(0, 0);
		kid = spawn_group_member(0, "G1");
		live("G", &kid, names, 1);
	}
	setpgid(G, G);

	Z1 = fork();
	if (Z1 == 0)
		_exit(7);
	Z2 = fork();
	if (Z2 == 0) {
		close(ready_w);
		signal(SIGUSR2, SIG_DFL);
		raise(SIGUSR2);
		_exit(1);
	}
	T = fork();
	if (T == 0)
		live("T", NULL, NULL, 0);
	close(ready_w);
	while (read(ready_r, &c, 1) == 1)
		;
	close(ready_r);
	/* zombies made, not reaped */
	if (waitid(P_PID, Z1, &si, WEXITED | WNOWAIT) || waitid(P_PID, Z2, &si, WEXITED | WNOWAIT))
		fail("waitid zombies");
	kill(T, SIGSTOP);
	if (waitpid(T, &st, WUNTRACED) != T || !WIFSTOPPED(st))
		fail("T did not stop");

	/* R's own ids as the dump will see them: recorded last, not first
	 * (started by `setsid -f`, R could see the short-lived setsid as its
	 * parent before that one exited and left R to init) */
	record(&ids);
	test_ready();
	test_waitsig();

	check_ids(&ids);
	check_cow();
	/* T is still stopped */
	{
		char path[64], buf[512], *s;
		int fd, n;

		snprintf(path, sizeof(path), "/proc/%d/stat", T);
		fd = open(path, O_RDONLY);
		n = fd < 0 ? -1 : read(fd, buf, sizeof(buf) - 1);
		if (n <= 0)
			fail("read %s", path);
		buf[n] = 0;
		s = strrchr(buf, ')');
		if (!s || s[2] != 'T')
			fail("T (pid %d) is not stopped any more: state %c", T, s ? s[2] : '?');
		close(fd);
	}
	shm[0] = 0x5151;
	mfd[0] = 0x6161;
	kill(B, SIGTERM);
	kill(S, SIGTERM);
	kill(G, SIGTERM);
	kill(T, SIGTERM);
	kill(T, SIGCONT);
	wait_child(B, "B");
	wait_child(S, "S");
	wait_child(G, "G");
	wait_child(T, "T");
	if (waitpid(Z1, &st, 0) != Z1 || !WIFEXITED(st) || WEXITSTATUS(st) != 7)
		fail("zombie Z1: status %#x, expected exit 7", st);
	if (waitpid(Z2, &st, 0) != Z2 || !WIFSIGNALED(st) || WTERMSIG(st) != SIGUSR2)
		fail("zombie Z2: status %#x, expected killed by SIGUSR2", st);
	if (shm[1] != 0xb0b0 || mfd[1] != 0xb1b1)
		fail("shared memory from B: %#lx %#lx", (unsigned long)shm[1], (unsigned long)mfd[1]);
	if (lseek(file_fd, 0, SEEK_CUR) != 14)
		fail("shared file offset %ld, expected 14", (long)lseek(file_fd, 0, SEEK_CUR));
	{
		char buf[16];
		ssize_t n = recv(sk, buf, sizeof(buf), MSG_DONTWAIT);

		if (n != 6 || memcmp(buf, "H-to-R", 6))
			fail("socket from B gave %zd bytes", n);
	}
	pass();
}
