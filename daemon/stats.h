/* stats.h: process-wide counters (loop thread only). */
#ifndef C2M_STATS_H
#define C2M_STATS_H

#include <stdint.h>

enum stat_id {
	STAT_REQUESTS,
	STAT_RESP_2_04,
	STAT_RESP_4_00,
	STAT_RESP_4_04,
	STAT_RESP_4_05,
	STAT_RESP_4_13,
	STAT_RESP_5_03,
	STAT_DUPLICATES,
	STAT_PUBLISHED,
	STAT_PUBLISH_FAILED,
	STAT_HANDSHAKE_OK,
	STAT_HANDSHAKE_FAILED,
	STAT_UNKNOWN_IDENTITY,
	STAT_NOTIFICATIONS,
	STAT_STALE_NOTIFICATIONS,
	STAT_COMMANDS,
	STAT_COMMAND_ERRORS,
	STAT__COUNT
};

void stats_inc(enum stat_id id);
uint64_t stats_get(enum stat_id id);
const char *stats_name(enum stat_id id);

#endif
