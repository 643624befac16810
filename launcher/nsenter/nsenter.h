// Shared by the constructors in nsenter.c and sandbox.c.
#ifndef NETNS_RUN_NSENTER_H
#define NETNS_RUN_NSENTER_H

// nsenter_join opens path and setns(2)s into it; -1 with errno on failure.
int nsenter_join(const char *path, int nstype);

#endif
