/* stats.c: process-wide counters, named for logs and metrics. */
#include "stats.h"

static uint64_t counters[STAT__COUNT];

static const char *const names[STAT__COUNT] = {
	[STAT_REQUESTS] = "requests",
	[STAT_RESP_2_04] = "responses_2_04",
	[STAT_RESP_4_00] = "responses_4_00",
	[STAT_RESP_4_01] = "responses_4_01",
	[STAT_RESP_4_04] = "responses_4_04",
	[STAT_RESP_4_05] = "responses_4_05",
	[STAT_RESP_4_13] = "responses_4_13",
	[STAT_RESP_5_03] = "responses_5_03",
	[STAT_DUPLICATES] = "duplicates",
	[STAT_PUBLISHED] = "published",
	[STAT_PUBLISH_FAILED] = "publish_failed",
	[STAT_PUBLISH_QOS0] = "publishes_qos0",
	[STAT_PUBLISH_QOS1] = "publishes_qos1",
	[STAT_PUBLISH_QOS2] = "publishes_qos2",
	[STAT_DROPPED] = "dropped",
	[STAT_HANDSHAKE_OK] = "handshakes_ok",
	[STAT_HS_WRONG_KEY] = "handshakes_failed_wrong_key",
	[STAT_HS_UNKNOWN_IDENTITY] = "handshakes_failed_unknown_identity",
	[STAT_HS_BAD_CERT] = "handshakes_failed_bad_certificate",
	[STAT_HS_DTLS_ERROR] = "handshakes_failed_dtls_error",
	[STAT_NOTIFICATIONS] = "notifications",
	[STAT_STALE_NOTIFICATIONS] = "stale_notifications",
	[STAT_COMMANDS] = "commands",
	[STAT_COMMAND_ERRORS] = "command_errors",
	[STAT_BROKER_LOST] = "broker_lost",
	[STAT_BROKER_RECONNECTS] = "broker_reconnects",
	[STAT_UPLOAD_NO_ROUTE] = "uploads_refused_no_route",
	[STAT_UPLOAD_BUSY] = "uploads_refused_busy",
	[STAT_ACKS_FULL] = "acks_refused",
};

void stats_inc(enum stat_id id)
{
	if (id < STAT__COUNT)
		counters[id]++;
}

uint64_t stats_get(enum stat_id id)
{
	return id < STAT__COUNT ? counters[id] : 0;
}

const char *stats_name(enum stat_id id)
{
	return id < STAT__COUNT && names[id] ? names[id] : "?";
}
