// The fast relay loop's thread (loop_c.go): an epoll loop over pairs of
// non-blocking TCP sockets, moving bytes through pipes with splice(2), as
// pasta's one thread does, outside the Go runtime.

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "cloop.h"

#define DEFAULT_PIPE (64 << 10)
#define BULK_PIPE (256 << 10)
#define BULK_BYTES (1 << 20)
// Kept pipes: each counts 16 pages against the user's pipe-user-pages-soft
// (16384 by default); they are closed after PIPES_IDLE_MS without a relay.
#define MAX_FREE_PIPES 32
#define PIPES_IDLE_MS 2000
#define WAKE_KEY UINT64_MAX
// An ended pair's note waits up to NOTE_DELAY_MS, with later ones, before
// Go is woken for it: its end function only counts and forgets.
#define NOTE_DELAY_MS 50

struct cl_pipe {
	int r, w, size;
};

struct cl_dir {
	struct cl_pipe p;
	int pending;
	int64_t total;
	int eof, grown;
};

struct cl_pair {
	// id is the pair's slot, reused once it is free; key is the caller's
	// name for it, never reused, which notes carry: a note may wait while
	// the slot takes another pair.
	uint32_t id;
	uint64_t key;
	int fd[2];
	int out[2];
	struct cl_dir dir[2];
};

struct cl_loop {
	int epfd, wakefd, notefd;
	pthread_t th;
	pthread_mutex_t mu;
	// pairs by id; ids are slots, reused once free.
	struct cl_pair **pairs;
	uint32_t cap, hint;
	struct cl_note *notes;
	size_t nnotes, capnotes;
	// signaled: Go was woken for the notes waiting; since: when the
	// first unsignaled one came.
	int signaled;
	struct timespec since;
	struct cl_pipe freep[MAX_FREE_PIPES];
	int nfree;
	int closing;
};

static int pipe_new(struct cl_pipe *p) {
	int fds[2];
	if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0)
		return -errno;
	p->r = fds[0];
	p->w = fds[1];
	p->size = DEFAULT_PIPE;
	return 0;
}

static void pipe_close(struct cl_pipe *p) {
	if (p->r >= 0) {
		close(p->r);
		close(p->w);
	}
	p->r = p->w = -1;
}

// Under mu.
static int pipe_get(struct cl_loop *l, struct cl_pipe *p) {
	if (l->nfree > 0) {
		*p = l->freep[--l->nfree];
		return 0;
	}
	return pipe_new(p);
}

// Under mu. A dirty pipe (its relay failed: it may hold bytes) or a grown
// one is closed.
static void pipe_put(struct cl_loop *l, struct cl_pipe *p, int dirty) {
	if (!dirty && p->r >= 0 && p->size == DEFAULT_PIPE && l->nfree < MAX_FREE_PIPES && !l->closing) {
		l->freep[l->nfree++] = *p;
		p->r = p->w = -1;
		return;
	}
	pipe_close(p);
}

static void reset_close(int fd) {
	struct linger lg = {.l_onoff = 1, .l_linger = 0};
	setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
	close(fd);
}

// Under mu.
static void signal_notes(struct cl_loop *l) {
	uint64_t one = 1;
	ssize_t n = write(l->notefd, &one, sizeof one);
	(void)n;
	l->signaled = 1;
}

static int64_t ms_since(const struct timespec *t) {
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return (int64_t)(now.tv_sec - t->tv_sec) * 1000 + (now.tv_nsec - t->tv_nsec) / 1000000;
}

// Under mu.
static void note(struct cl_loop *l, uint64_t key, int64_t up, int64_t down) {
	if (l->nnotes == l->capnotes) {
		size_t cap = l->capnotes ? 2 * l->capnotes : 64;
		struct cl_note *n = realloc(l->notes, cap * sizeof *n);
		if (!n)
			return;  // the note is lost: Go's side keeps the pair's functions
		l->notes = n;
		l->capnotes = cap;
	}
	l->notes[l->nnotes++] = (struct cl_note){.key = key, .up = up, .down = down};
	if (l->signaled)
		return;
	if (l->nnotes == 1)
		clock_gettime(CLOCK_MONOTONIC, &l->since);
	if (l->nnotes >= 64)
		signal_notes(l);
}

static int watch(struct cl_loop *l, struct cl_pair *p, int side, int op, int out) {
	struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | EPOLLET | (out ? EPOLLOUT : 0),
	                         .data.u64 = (uint64_t)p->id << 1 | (uint64_t)side};
	return epoll_ctl(l->epfd, op, p->fd[side], &ev) < 0 ? -errno : 0;
}

static int want_output(struct cl_loop *l, struct cl_pair *p, int side, int want) {
	if (p->out[side] == want)
		return 0;
	p->out[side] = want;
	return watch(l, p, side, EPOLL_CTL_MOD, want);
}

// pump moves direction d of p (0: fd[0] to fd[1]) until the source has
// nothing more or the destination is full; it returns 0 or -errno.
static int pump(struct cl_loop *l, struct cl_pair *p, int d) {
	int src = p->fd[d], dst = p->fd[1 - d];
	struct cl_dir *dir = &p->dir[d];
	for (;;) {
		while (dir->pending > 0) {
			ssize_t n = splice(dir->p.r, NULL, dst, NULL, dir->pending, SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
			if (n < 0) {
				if (errno == EINTR)
					continue;
				if (errno == EAGAIN)
					return want_output(l, p, 1 - d, 1);
				return -errno;
			}
			dir->pending -= n;
			dir->total += n;
			if (dir->pending == 0) {
				int err = want_output(l, p, 1 - d, 0);
				if (err)
					return err;
				// The pipe is empty: a bulk direction's grows once.
				if (!dir->grown && dir->total >= BULK_BYTES) {
					dir->grown = 1;
					int sz = fcntl(dir->p.w, F_SETPIPE_SZ, BULK_PIPE);
					if (sz > 0)
						dir->p.size = sz;
				}
			}
		}
		if (dir->eof)
			return 0;
		ssize_t n = splice(src, NULL, dir->p.w, NULL, dir->p.size, SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				return 0;
			return -errno;
		}
		if (n == 0) {
			dir->eof = 1;
			shutdown(dst, SHUT_WR);
			return 0;
		}
		dir->pending = n;
	}
}

static void finish(struct cl_loop *l, struct cl_pair *p, int failed) {
	if (failed) {
		reset_close(p->fd[0]);
		reset_close(p->fd[1]);
	} else {
		close(p->fd[0]);
		close(p->fd[1]);
	}
	pthread_mutex_lock(&l->mu);
	l->pairs[p->id] = NULL;
	pipe_put(l, &p->dir[0].p, failed);
	pipe_put(l, &p->dir[1].p, failed);
	note(l, p->key, p->dir[0].total, p->dir[1].total);
	pthread_mutex_unlock(&l->mu);
	free(p);
}

static void event(struct cl_loop *l, struct epoll_event *ev) {
	uint32_t id = (uint32_t)(ev->data.u64 >> 1);
	int side = (int)(ev->data.u64 & 1);
	pthread_mutex_lock(&l->mu);
	struct cl_pair *p = id < l->cap ? l->pairs[id] : NULL;
	pthread_mutex_unlock(&l->mu);
	// Only this thread ends pairs: p stays valid below.
	if (!p)
		return;
	int err = 0;
	// Input on a socket moves its direction; output drains the other's.
	if (ev->events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
		err = pump(l, p, side);
	if (!err && ev->events & (EPOLLOUT | EPOLLHUP | EPOLLERR))
		err = pump(l, p, 1 - side);
	if (!err && ev->events & EPOLLERR) {
		// A reset after the socket's end of stream: nothing left to
		// read reports it.
		int soerr = 0;
		socklen_t n = sizeof soerr;
		if (getsockopt(p->fd[side], SOL_SOCKET, SO_ERROR, &soerr, &n) == 0 && soerr)
			err = -soerr;
	}
	if (err)
		finish(l, p, 1);
	else if (p->dir[0].eof && p->dir[1].eof && !p->dir[0].pending && !p->dir[1].pending)
		finish(l, p, 0);
}

static void *run(void *arg) {
	struct cl_loop *l = arg;
	struct epoll_event evs[64];
	for (;;) {
		pthread_mutex_lock(&l->mu);
		int timeout = l->nfree > 0 ? PIPES_IDLE_MS : -1;
		if (l->nnotes > 0 && !l->signaled) {
			int64_t left = NOTE_DELAY_MS - ms_since(&l->since);
			if (left <= 0) {
				signal_notes(l);
			} else if (timeout < 0 || left < timeout) {
				timeout = (int)left;
			}
		}
		int idle_trim = timeout == PIPES_IDLE_MS;
		pthread_mutex_unlock(&l->mu);
		int n = epoll_wait(l->epfd, evs, 64, timeout);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (n == 0) {
			if (idle_trim) {
				// No relay for a while: the kept pipes go.
				pthread_mutex_lock(&l->mu);
				while (l->nfree > 0)
					pipe_close(&l->freep[--l->nfree]);
				pthread_mutex_unlock(&l->mu);
			}
			continue;
		}
		for (int i = 0; i < n; i++) {
			if (evs[i].data.u64 == WAKE_KEY) {
				uint64_t v;
				ssize_t r = read(l->wakefd, &v, sizeof v);
				(void)r;
				continue;
			}
			event(l, &evs[i]);
		}
		pthread_mutex_lock(&l->mu);
		int closing = l->closing;
		pthread_mutex_unlock(&l->mu);
		if (closing)
			break;
	}
	return NULL;
}

struct cl_loop *cl_new(int notefd, int *err) {
	struct cl_loop *l = calloc(1, sizeof *l);
	if (!l) {
		*err = ENOMEM;
		return NULL;
	}
	l->notefd = notefd;
	l->wakefd = -1;
	pthread_mutex_init(&l->mu, NULL);
	l->epfd = epoll_create1(EPOLL_CLOEXEC);
	if (l->epfd < 0)
		goto fail;
	l->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (l->wakefd < 0)
		goto fail;
	struct epoll_event ev = {.events = EPOLLIN, .data.u64 = WAKE_KEY};
	if (epoll_ctl(l->epfd, EPOLL_CTL_ADD, l->wakefd, &ev) < 0)
		goto fail;
	// The thread starts with every signal blocked: they are the Go
	// threads' to take, and a splice into a socket whose peer reset
	// raises SIGPIPE at the thread, which, not a Go one, would die of
	// it; blocked, the call says EPIPE.
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	int perr = pthread_create(&l->th, NULL, run, l);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (perr) {
		errno = perr;
		goto fail;
	}
	return l;
fail:
	*err = errno;
	if (l->wakefd >= 0)
		close(l->wakefd);
	if (l->epfd >= 0)
		close(l->epfd);
	pthread_mutex_destroy(&l->mu);
	free(l);
	return NULL;
}

int cl_add(struct cl_loop *l, int a, int b, int64_t up, int64_t down, uint64_t key) {
	struct cl_pair *p = calloc(1, sizeof *p);
	int err = 0;
	if (!p) {
		err = -ENOMEM;
		goto fail;
	}
	p->key = key;
	p->fd[0] = a;
	p->fd[1] = b;
	p->dir[0].total = up;
	p->dir[1].total = down;
	p->dir[0].p.r = p->dir[1].p.r = -1;
	pthread_mutex_lock(&l->mu);
	if (l->closing) {
		err = -EBADF;
	} else if ((err = pipe_get(l, &p->dir[0].p)) == 0 && (err = pipe_get(l, &p->dir[1].p)) == 0) {
		// The first free slot from the last one taken.
		uint32_t id = l->cap;
		for (uint32_t i = 0; i < l->cap; i++) {
			uint32_t j = (l->hint + i) % l->cap;
			if (!l->pairs[j]) {
				id = j;
				break;
			}
		}
		if (id == l->cap) {
			uint32_t cap = l->cap ? 2 * l->cap : 64;
			struct cl_pair **n = realloc(l->pairs, cap * sizeof *n);
			if (!n) {
				err = -ENOMEM;
			} else {
				memset(n + l->cap, 0, (cap - l->cap) * sizeof *n);
				l->pairs = n;
				l->cap = cap;
			}
		}
		if (!err) {
			p->id = id;
			l->pairs[id] = p;
			l->hint = id + 1;
			// Registered under the lock: an event finds the pair.
			if ((err = watch(l, p, 0, EPOLL_CTL_ADD, 0)) == 0)
				err = watch(l, p, 1, EPOLL_CTL_ADD, 0);
			if (err) {
				epoll_ctl(l->epfd, EPOLL_CTL_DEL, a, NULL);
				l->pairs[id] = NULL;
			}
		}
	}
	if (err) {
		pipe_put(l, &p->dir[0].p, 1);
		pipe_put(l, &p->dir[1].p, 1);
	}
	pthread_mutex_unlock(&l->mu);
	// Not p's fields: once registered and unlocked, p is the thread's,
	// which may have ended and freed it already.
	if (!err)
		return 0;
fail:
	reset_close(a);
	reset_close(b);
	free(p);
	return err;
}

size_t cl_take_notes(struct cl_loop *l, struct cl_note *buf, size_t max) {
	pthread_mutex_lock(&l->mu);
	l->signaled = 0;
	size_t n = l->nnotes < max ? l->nnotes : max;
	memcpy(buf, l->notes, n * sizeof *buf);
	memmove(l->notes, l->notes + n, (l->nnotes - n) * sizeof *buf);
	l->nnotes -= n;
	pthread_mutex_unlock(&l->mu);
	return n;
}

void cl_stop(struct cl_loop *l) {
	pthread_mutex_lock(&l->mu);
	l->closing = 1;
	pthread_mutex_unlock(&l->mu);
	uint64_t one = 1;
	ssize_t w = write(l->wakefd, &one, sizeof one);
	(void)w;
	pthread_join(l->th, NULL);
	pthread_mutex_lock(&l->mu);
	for (uint32_t id = 0; id < l->cap; id++) {
		struct cl_pair *p = l->pairs[id];
		if (!p)
			continue;
		l->pairs[id] = NULL;
		reset_close(p->fd[0]);
		reset_close(p->fd[1]);
		pipe_close(&p->dir[0].p);
		pipe_close(&p->dir[1].p);
		free(p);
	}
	while (l->nfree > 0)
		pipe_close(&l->freep[--l->nfree]);
	pthread_mutex_unlock(&l->mu);
}

void cl_free(struct cl_loop *l) {
	close(l->wakefd);
	close(l->epfd);
	free(l->pairs);
	free(l->notes);
	pthread_mutex_destroy(&l->mu);
	free(l);
}

int cl_kept_pipes(struct cl_loop *l) {
	pthread_mutex_lock(&l->mu);
	int n = l->nfree;
	pthread_mutex_unlock(&l->mu);
	return n;
}
