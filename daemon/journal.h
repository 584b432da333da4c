/* journal.h: the gateway's durable store of readings in mqtt.persistence_dir — an append-only log
 * of checksummed records, group-committed (one write + fdatasync per batch) by a writer thread,
 * replayed to the broker until each record's PUBACK retires it (design.md, Delivery semantics). */
#ifndef C2M_JOURNAL_H
#define C2M_JOURNAL_H

#include <stddef.h>
#include <stdint.h>

#include "mqtt.h"

struct event_base;

enum journal_event {
	JOURNAL_STORED,		/* the record is on disk (its fdatasync returned) */
	JOURNAL_NOT_STORED,	/* the write or the sync failed: the reading was not taken */
	JOURNAL_DELIVERED,	/* the broker acknowledged it (only while the caller is attached) */
};

/* Called on the loop thread: STORED or NOT_STORED once, then DELIVERED unless detached. */
typedef void (*journal_fn)(void *arg, enum journal_event ev);

enum journal_take {
	JOURNAL_TAKEN,		/* *seq names the record; journal_fn follows */
	JOURNAL_FULL,		/* a limit (records, bytes, free space) or a recent store error */
};

struct journal_limits {
	size_t max_records;	/* mqtt.max_buffered */
	uint64_t max_bytes;	/* mqtt.max_buffered_bytes */
};

/* Opens (creates) dir, checks every segment, cuts a torn or corrupt tail, loads every unretired
 * record for publishing, and starts the writer thread. Blocks: call before the loop runs. */
int journal_open(struct event_base *base, const char *dir, const struct journal_limits *lim);
/* Appends a reading (QoS ≥ 1); the message is copied. */
enum journal_take journal_append(const struct mqtt_msg *m, journal_fn fn, void *arg,
				 uint64_t *seq);
/* The caller no longer wants events for seq (it answered the device already). */
void journal_detach(uint64_t seq);
/* The broker connection came up or went down (replay on every connect). */
void journal_mqtt_state(int connected);
/* Why the last append was refused, for the log line ("journal full", "disk full: ..."). */
const char *journal_refusal(void);
/* Commits what was appended, waiting for the writer (shutdown only). */
void journal_flush(void);
/* Writes the pending retirements, stops the writer, frees everything (shutdown). */
void journal_close(void);

struct journal_stats {
	size_t records;			/* unretired records (stored or being stored) */
	uint64_t bytes;			/* bytes in segment files */
	size_t segments;
	size_t in_flight;		/* records handed to the MQTT client, not yet acknowledged */
	uint64_t commits, fsyncs, committed_records, replays, store_errors, cut_bytes;
	double fsync_p50_ms, fsync_p99_ms;	/* over the last 1024 fsyncs */
};
void journal_get_stats(struct journal_stats *s);

/* Record framing, exposed for the fuzzer and the unit test: parses one frame at buf. Returns its
 * total length, 0 when buf holds no complete valid frame (torn, corrupt or too large). */
size_t journal_frame_check(const uint8_t *buf, size_t len);
uint32_t journal_crc32c(uint32_t crc, const void *buf, size_t len);

#endif
