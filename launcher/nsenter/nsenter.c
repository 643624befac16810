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

#include "nsenter.h"

int nsenter_errno;
const char *nsenter_step = "";
int nsenter_userns_errno;

int nsenter_join(const char *path, int nstype) {
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
		if (nsenter_join(userns, CLONE_NEWUSER) < 0)
			nsenter_userns_errno = errno;
	}
	if (mntns != NULL && *mntns != '\0') {
		// Joining a mount namespace resets root and working directory;
		// keep the caller's directory when it exists there too.
		char cwd[4096];
		int have_cwd = getcwd(cwd, sizeof(cwd)) != NULL;
		if (nsenter_join(mntns, CLONE_NEWNS) < 0) {
			nsenter_errno = errno;
			nsenter_step = "join mount namespace";
			return;
		}
		if (!have_cwd || chdir(cwd) < 0)
			chdir("/");
	}
	if (utsns != NULL && *utsns != '\0' && nsenter_join(utsns, CLONE_NEWUTS) < 0) {
		nsenter_errno = errno;
		nsenter_step = "join UTS namespace";
		return;
	}
	if (nsenter_join(netns, CLONE_NEWNET) < 0) {
		nsenter_errno = errno;
		nsenter_step = "join network namespace";
	}
}
