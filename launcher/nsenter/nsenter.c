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
	if (netns == NULL || *netns == '\0')
		return;
	if (userns != NULL && *userns != '\0') {
		// Like slirp4netns, a failure here is not fatal: the caller may
		// already be inside that user namespace (EINVAL), or be root.
		if (join(userns, CLONE_NEWUSER) < 0)
			nsenter_userns_errno = errno;
	}
	if (join(netns, CLONE_NEWNET) < 0) {
		nsenter_errno = errno;
		nsenter_step = "join network namespace";
	}
}
