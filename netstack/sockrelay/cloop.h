#include <stddef.h>
#include <stdint.h>

// What the loop's thread tells Go: a pair ended, with its bytes each way.
struct cl_note {
	uint64_t key;
	int64_t up, down;
};

struct cl_loop;

// cl_new starts a loop that writes to the eventfd notefd when notes are
// waiting; NULL and *err on failure.
struct cl_loop *cl_new(int notefd, int *err);
// cl_add relays a and b (the loop owns them from here, also on failure),
// counting on from up and down; the pair's note carries key. 0 or -errno.
int cl_add(struct cl_loop *l, int a, int b, int64_t up, int64_t down, uint64_t key);
// cl_take_notes moves up to max waiting notes into buf; how many.
size_t cl_take_notes(struct cl_loop *l, struct cl_note *buf, size_t max);
// cl_stop stops the thread and resets every pair: nothing is noted after
// it. Notes may still be taken until cl_free.
void cl_stop(struct cl_loop *l);
void cl_free(struct cl_loop *l);
// cl_kept_pipes counts the pipes kept for later pairs.
int cl_kept_pipes(struct cl_loop *l);
