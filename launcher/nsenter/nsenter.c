// Runs before the Go runtime starts (an ELF constructor), while the process
// is still single-threaded: the only time setns(CLONE_NEWUSER) can succeed.
// Inactive unless the launcher set the environment variables below.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int nsenter_errno;
const char *nsenter_step = "";
int nsenter_userns_errno;

static int join(const char *path, int nstype) {
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	int rc = setns(fd, nstype);
	int saved = errno;
	close(fd);
	errno = saved;
	return rc;
}

__attribute__((constructor)) static void netns_run_nsenter(void) {
	const char *netns = getenv("_NETNS_RUN_NSENTER_NET");
	const char *userns = getenv("_NETNS_RUN_NSENTER_USER");
	const char *mntns = getenv("_NETNS_RUN_NSENTER_MNT");
	const char *utsns = getenv("_NETNS_RUN_NSENTER_UTS");
	if (netns == NULL || *netns == '\0')
		return;
	if (userns != NULL && *userns != '\0') {
		// Like slirp4netns, a failure here is not fatal: the caller may
		// already be inside that user namespace (EINVAL), or be root.
		if (join(userns, CLONE_NEWUSER) < 0)
			nsenter_userns_errno = errno;
	}
	if (mntns != NULL && *mntns != '\0') {
		// Joining a mount namespace resets root and working directory;
		// keep the caller's directory when it exists there too.
		char cwd[4096];
		int have_cwd = getcwd(cwd, sizeof(cwd)) != NULL;
		if (join(mntns, CLONE_NEWNS) < 0) {
			nsenter_errno = errno;
			nsenter_step = "join mount namespace";
			return;
		}
		if (!have_cwd || chdir(cwd) < 0)
			chdir("/");
	}
	if (utsns != NULL && *utsns != '\0' && join(utsns, CLONE_NEWUTS) < 0) {
		nsenter_errno = errno;
		nsenter_step = "join UTS namespace";
		return;
	}
	if (join(netns, CLONE_NEWNET) < 0) {
		nsenter_errno = errno;
		nsenter_step = "join network namespace";
	}
}

// --- sandbox ---------------------------------------------------------------
// slirp4netns's --enable-sandbox, done here for the same reason as the join:
// unshare(CLONE_NEWNS) and pivot_root only affect the calling thread's view
// once Go has started threads. The new root is a tmpfs holding read-only
// binds of /etc and /run; capabilities are dropped to CAP_NET_BIND_SERVICE
// and no_new_privs is set.
//
// The helper is made non-dumpable before it joins the container's user
// namespace and stays so: once its credentials live in that namespace, the
// container's root holds every capability over it there, and a dumpable
// helper could be ptraced (or its /proc/PID/mem opened) and driven to do
// anything it may, such as reaching the host's loopback. Non-dumpable, the
// kernel asks for CAP_SYS_PTRACE in the namespace the helper was executed
// in (the host's), which the container does not have.
#include <linux/capability.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>

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
	return 0;
}

static int drop_caps(void) {
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		return fail("set no_new_privs");
	for (int cap = 0; cap <= 63; cap++) {
		if (cap == CAP_NET_BIND_SERVICE)
			continue;
		if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL)
			return fail("drop bounding capabilities");
	}
	prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
	struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
	struct __user_cap_data_struct data[2];
	memset(data, 0, sizeof(data));
	data[0].effective = data[0].permitted = data[0].inheritable = 1u << CAP_NET_BIND_SERVICE;
	if (syscall(SYS_capset, &hdr, data) < 0)
		return fail("set capabilities");
	return 0;
}

static int enter_sandbox(const char *userns) {
	// Before the join, so there is no moment when the container could
	// attach.
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
		return fail("make the helper non-dumpable");
	if (geteuid() != 0 && userns != NULL && *userns != '\0') {
		// Unprivileged: become root in the container's user namespace,
		// which may then create the mount namespace.
		if (join(userns, CLONE_NEWUSER) < 0)
			return fail("join user namespace for the sandbox");
	}
	if (unshare(CLONE_NEWNS) < 0)
		return fail("unshare mount namespace");
	if (mount(NULL, "/", NULL, MS_REC | MS_SLAVE, NULL) < 0)
		return fail("make mounts slaves");
	if (mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=16k,mode=755") < 0)
		return fail("mount sandbox tmpfs");
	if (bind_ro("/etc", "/tmp/etc") < 0 || bind_ro("/run", "/tmp/run") < 0)
		return -1;
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
	// Best effort, as in slirp4netns (a read-only tmpfs root is not
	// possible everywhere).
	mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	if (drop_caps() < 0)
		return -1;
	// Again after the last credential change: the kernel resets
	// dumpability to fs.suid_dumpable (which may be 1) when a change does
	// not look like a subset of the old credentials. Nothing later changes
	// credentials or execs.
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
		return fail("make the helper non-dumpable");
	return 0;
}

__attribute__((constructor)) static void netns_run_sandbox(void) {
	const char *on = getenv("_NETNS_RUN_SANDBOX");
	if (on == NULL || strcmp(on, "1") != 0)
		return;
	enter_sandbox(getenv("_NETNS_RUN_SANDBOX_USERNS"));
}
