// Sandboxes entered before the Go runtime starts, for the same reason as
// the join in nsenter.c: unshare(CLONE_NEWNS) and pivot_root only affect the
// calling thread's view once Go has started threads. Two kinds, chosen by
// _NETNS_RUN_SANDBOX:
//
// "1": slirp4netns's --enable-sandbox for usernet. The helper joins the
// container's user namespace (if it is not root), unshares a mount
// namespace and pivots into a tmpfs holding read-only binds of /etc and
// /run; capabilities are dropped to CAP_NET_BIND_SERVICE. The user
// namespace comes as a descriptor the process before the exec opened
// (_NETNS_RUN_SANDBOX_USERNS_FD): its path may lead anywhere, through
// /proc/PID/... or a runtime's directory, and is not looked up again.
//
// "engine": netns-run's packet engine. Clone already put it in fresh user,
// mount, PID and IPC namespaces as their root; it keeps descriptors 0-2
// and the _NETNS_RUN_SANDBOX_FILES it was given from 3 on, pivots into an
// empty read-only tmpfs and drops every capability.
//
// Both set no_new_privs, and close any descriptor that names a directory or
// is an O_PATH handle: such a handle survives pivot_root, and
// openat(fd, "../..") walks out of the sandbox.
//
// Both are non-dumpable from the start and stay so. usernet's helper joins
// the container's user namespace, where the container's root holds every
// capability; a dumpable helper could be ptraced (or its /proc/PID/mem
// opened) and driven to do anything it may, such as reaching the host's
// loopback. Non-dumpable, the kernel asks for CAP_SYS_PTRACE in the
// namespace the process was executed in, which the container does not have.
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/capability.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

int sandbox_errno;
const char *sandbox_step = "";

static int fail(const char *step) {
	sandbox_errno = errno;
	sandbox_step = step;
	return -1;
}

static int bind_ro(const char *src, const char *dst) {
	if (mkdir(dst, 0755) < 0 && errno != EEXIST)
		return fail("mkdir sandbox mount point");
	if (mount(src, dst, NULL, MS_BIND | MS_REC, NULL) < 0)
		return fail("bind into sandbox");
	if (mount(NULL, dst, NULL, MS_REC | MS_SLAVE, NULL) < 0)
		return fail("make sandbox bind a slave");
	if (mount(NULL, dst, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
		return fail("remount sandbox bind read-only");
	// The remount changes the top mount alone: the mounts below it
	// (/run/user/UID, /run/netns, ...) would stay writable. Kernels
	// before 5.12 lack the call, and keep only the top read-only.
	struct mount_attr attr = {.attr_set = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC};
	if (syscall(SYS_mount_setattr, AT_FDCWD, dst, AT_RECURSIVE, &attr, sizeof attr) < 0 && errno != ENOSYS)
		return fail("make sandbox binds read-only");
	return 0;
}

// drop_caps sets no_new_privs and leaves keep (or, with -1, nothing) in
// every capability set.
static int drop_caps(int keep) {
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		return fail("set no_new_privs");
	for (int cap = 0; cap <= 63; cap++) {
		if (cap == keep)
			continue;
		if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL)
			return fail("drop bounding capabilities");
	}
	prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
	struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
	struct __user_cap_data_struct data[2];
	memset(data, 0, sizeof(data));
	if (keep >= 0)
		data[0].effective = data[0].permitted = data[0].inheritable = 1u << keep;
	if (syscall(SYS_capset, &hdr, data) < 0)
		return fail("set capabilities");
	// Again after the last credential change: the kernel resets
	// dumpability to fs.suid_dumpable (which may be 1) when a change does
	// not look like a subset of the old credentials. Nothing later changes
	// credentials or execs.
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
		return fail("make non-dumpable");
	return 0;
}

// handle_escapes reports whether fd could lead out of a pivot_root.
static int handle_escapes(int fd) {
	struct stat st;
	int flags = fcntl(fd, F_GETFL);
	if (flags >= 0 && (flags & O_PATH))
		return 1;
	return fstat(fd, &st) == 0 && S_ISDIR(st.st_mode);
}

// close_escapes closes every descriptor from `from` on, and below it every
// one that names a directory or is an O_PATH handle; 0-2 become /dev/null
// instead, so later opens do not land there.
static int close_escapes(int from) {
	DIR *d = opendir("/proc/self/fd");
	if (d == NULL)
		return fail("list descriptors");
	int own = dirfd(d);
	struct dirent *e;
	while ((e = readdir(d)) != NULL) {
		if (e->d_name[0] == '.')
			continue;
		int fd = atoi(e->d_name);
		if (fd == own || (fd < from && !handle_escapes(fd)))
			continue;
		if (fd > 2) {
			close(fd);
			continue;
		}
		int null = open("/dev/null", O_RDWR | O_CLOEXEC);
		if (null < 0 || dup2(null, fd) < 0) {
			closedir(d);
			return fail("replace a directory descriptor with /dev/null");
		}
		close(null);
	}
	closedir(d);
	return 0;
}

// pivot_to_tmp makes the tmpfs mounted on /tmp the root and detaches the
// old one.
static int pivot_to_tmp(void) {
	if (mkdir("/tmp/old", 0700) < 0)
		return fail("mkdir old root");
	if (chdir("/tmp") < 0)
		return fail("chdir sandbox root");
	if (syscall(SYS_pivot_root, ".", "old") < 0)
		return fail("pivot_root");
	if (chdir("/") < 0)
		return fail("chdir /");
	if (umount2("/old", MNT_DETACH) < 0)
		return fail("detach old root");
	if (rmdir("/old") < 0)
		return fail("remove old root mount point");
	return 0;
}

// join_userns joins the user namespace open as descriptor fd (the
// variable's value; none if it is unset) when we are not root, becoming
// root in it, and closes the descriptor either way: nothing that names a
// namespace stays open in the sandbox.
static int join_userns(const char *fd_var) {
	if (fd_var == NULL || *fd_var == '\0')
		return 0;
	char *end;
	long fd = strtol(fd_var, &end, 10);
	if (*end != '\0' || fd < 0 || fd > INT_MAX) {
		errno = EBADF;
		return fail("user namespace descriptor for the sandbox");
	}
	int rc = 0;
	if (geteuid() != 0 && setns((int)fd, CLONE_NEWUSER) < 0)
		rc = fail("join user namespace for the sandbox");
	close((int)fd);
	return rc;
}

static int enter_sandbox(const char *userns_fd) {
	// Before the join, so there is no moment when the container could
	// attach.
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
		return fail("make non-dumpable");
	if (close_escapes(INT_MAX) < 0)
		return -1;
	// Unprivileged: become root in the container's user namespace, which
	// may then create the mount namespace.
	if (join_userns(userns_fd) < 0)
		return -1;
	if (unshare(CLONE_NEWNS) < 0)
		return fail("unshare mount namespace");
	if (mount(NULL, "/", NULL, MS_REC | MS_SLAVE, NULL) < 0)
		return fail("make mounts slaves");
	if (mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=16k,mode=755") < 0)
		return fail("mount sandbox tmpfs");
	if (bind_ro("/etc", "/tmp/etc") < 0 || bind_ro("/run", "/tmp/run") < 0)
		return -1;
	if (pivot_to_tmp() < 0)
		return -1;
	// Best effort, as in slirp4netns (a read-only tmpfs root is not
	// possible everywhere).
	mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	return drop_caps(CAP_NET_BIND_SERVICE);
}

static int enter_engine_sandbox(const char *files) {
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
		return fail("make non-dumpable");
	// Its name in ps and top (the exec made it "exe"); threads inherit it.
	prctl(PR_SET_NAME, "netns-engine", 0, 0, 0);
	int n = files != NULL ? atoi(files) : 0;
	// Only what the parent handed over: nothing it inherited by accident.
	if (close_escapes(3 + n) < 0)
		return -1;
	// Nothing propagates in or out of this mount namespace.
	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
		return fail("make mounts private");
	if (mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=700") < 0)
		return fail("mount sandbox tmpfs");
	if (pivot_to_tmp() < 0)
		return -1;
	if (mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
		return fail("remount sandbox root read-only");
	return drop_caps(-1);
}

__attribute__((constructor)) static void netns_run_sandbox(void) {
	const char *kind = getenv("_NETNS_RUN_SANDBOX");
	if (kind == NULL)
		return;
	if (strcmp(kind, "1") == 0)
		enter_sandbox(getenv("_NETNS_RUN_SANDBOX_USERNS_FD"));
	else if (strcmp(kind, "engine") == 0)
		enter_engine_sandbox(getenv("_NETNS_RUN_SANDBOX_FILES"));
}
