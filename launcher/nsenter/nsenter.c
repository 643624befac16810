// Runs before the Go runtime starts (an ELF constructor), while the process
// is still single-threaded: the only time setns(CLONE_NEWUSER) can succeed.
// Inactive unless the launcher set the environment variables below.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

int nsenter_errno;
const char *nsenter_step = "";
int nsenter_userns_errno;

// The namespaces to join, in the order they are joined: the user namespace
// first (it grants the rights for the others), the network namespace last.
enum { NS_USER, NS_MNT, NS_UTS, NS_PID, NS_NET, NS_COUNT };

static const struct {
	const char *env, *open_step, *join_step;
	int type;
} ns_kinds[NS_COUNT] = {
	{"_NETNS_RUN_NSENTER_USER", "open user namespace", "join user namespace", CLONE_NEWUSER},
	{"_NETNS_RUN_NSENTER_MNT", "open mount namespace", "join mount namespace", CLONE_NEWNS},
	{"_NETNS_RUN_NSENTER_UTS", "open UTS namespace", "join UTS namespace", CLONE_NEWUTS},
	{"_NETNS_RUN_NSENTER_PID", "open PID namespace", "join PID namespace", CLONE_NEWPID},
	{"_NETNS_RUN_NSENTER_NET", "open network namespace", "join network namespace", CLONE_NEWNET},
};

// joined_child is the process that went on into the PID namespace; its
// parent only relays signals to it and its status back.
static pid_t joined_child;

static void relay_signal(int sig) {
	if (joined_child > 0)
		kill(joined_child, sig);
}

// enter_pid_namespace forks after setns(CLONE_NEWPID), which moves only
// the caller's future children, and lets the child go on to the Go
// runtime (which could not even start threads in the caller: clone with
// CLONE_THREAD fails once the two PID namespaces differ). The parent stays
// here, as nsenter(1) does: it forwards signals, mirrors job-control stops
// and exits with the child's status (128+N for signal N).
static int enter_pid_namespace(void) {
	pid_t child = fork();
	if (child < 0)
		return -1;
	if (child == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
		return 0;
	}
	joined_child = child;
	prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = relay_signal;
	int relayed[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH};
	for (unsigned i = 0; i < sizeof(relayed) / sizeof(relayed[0]); i++)
		sigaction(relayed[i], &sa, NULL);
	for (;;) {
		int status;
		if (waitpid(child, &status, WUNTRACED) < 0) {
			if (errno == EINTR)
				continue;
			_exit(125);
		}
		if (WIFSTOPPED(status)) {
			kill(getpid(), SIGSTOP);
			kill(child, SIGCONT);
			continue;
		}
		if (WIFSIGNALED(status))
			_exit(128 + WTERMSIG(status));
		_exit(WEXITSTATUS(status));
	}
}

// The launcher passes each namespace as an inherited descriptor, named
// /proc/self/fd/N. Once our own copy is open, N is closed: left open (it
// is not close-on-exec), it stayed in the helpers and in the command that
// --join runs.
static void close_passed(const char *path) {
	static const char prefix[] = "/proc/self/fd/";
	if (strncmp(path, prefix, sizeof(prefix) - 1) != 0)
		return;
	const char *digits = path + sizeof(prefix) - 1;
	char *end;
	long fd = strtol(digits, &end, 10);
	if (end == digits || *end != '\0' || fd <= 2 || fd > 1 << 20)
		return;
	close((int)fd);
}

static void close_all(int *fds) {
	for (int i = 0; i < NS_COUNT; i++)
		if (fds[i] >= 0)
			close(fds[i]);
}

__attribute__((constructor)) static void netns_run_nsenter(void) {
	const char *netns = getenv(ns_kinds[NS_NET].env);
	if (netns == NULL || *netns == '\0')
		return;
	// Not dumpable, first: joining a user namespace we own keeps the
	// flag, and in the target's (a container's) its root would then hold
	// every capability over us: /proc/PID/root and /proc/PID/environ
	// would lead it to the host's files, ptrace into our mount namespace.
	// (An exec resets it: the command that --join runs is as any.)
	prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
	// Every handle is opened before the first setns: after joining the
	// mount namespace, /proc is the target's, where a /proc/PID/ns path
	// of ours (or /proc/self/fd/N, for a process outside the target's PID
	// namespace) no longer resolves.
	int fds[NS_COUNT];
	for (int i = 0; i < NS_COUNT; i++) {
		fds[i] = -1;
		const char *path = getenv(ns_kinds[i].env);
		if (path == NULL || *path == '\0')
			continue;
		fds[i] = open(path, O_RDONLY | O_CLOEXEC);
		close_passed(path);
		if (fds[i] >= 0)
			continue;
		if (i == NS_USER) {
			nsenter_userns_errno = errno;
			continue;
		}
		nsenter_errno = errno;
		nsenter_step = ns_kinds[i].open_step;
		close_all(fds);
		return;
	}
	// Like slirp4netns, failing to join the user namespace is not fatal:
	// the caller may already be inside it (EINVAL), or be root.
	if (fds[NS_USER] >= 0 && setns(fds[NS_USER], CLONE_NEWUSER) < 0)
		nsenter_userns_errno = errno;
	for (int i = NS_MNT; i < NS_COUNT; i++) {
		if (fds[i] < 0)
			continue;
		// Joining a mount namespace resets root and working directory;
		// keep the caller's directory when it exists there too.
		char cwd[4096];
		int have_cwd = i == NS_MNT && getcwd(cwd, sizeof(cwd)) != NULL;
		if (setns(fds[i], ns_kinds[i].type) < 0) {
			nsenter_errno = errno;
			nsenter_step = ns_kinds[i].join_step;
			close_all(fds);
			return;
		}
		if (i == NS_MNT && (!have_cwd || chdir(cwd) < 0))
			chdir("/");
	}
	int joined_pid = fds[NS_PID] >= 0;
	close_all(fds);
	if (joined_pid && enter_pid_namespace() < 0) {
		nsenter_errno = errno;
		nsenter_step = "fork into the PID namespace";
	}
}
