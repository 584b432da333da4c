/* stats.h: process-wide counters (loop thread only); metrics.c exports them. */
#ifndef C2M_STATS_H
#define C2M_STATS_H

#include <stdint.h>

enum stat_id {
	STAT_REQUESTS,			/* device requests received (duplicates included) */
	STAT_RESP_2_04,			/* uplink answers by code */
	STAT_RESP_4_00,
	STAT_RESP_4_01,			/* identity revoked by a reload, or not protected as the
					 * listener wants (OSCORE) */
	STAT_RESP_4_04,
	STAT_RESP_4_05,
	STAT_RESP_4_13,
	STAT_RESP_5_03,
	STAT_DUPLICATES,		/* retransmitted CONs answered again, not published */
	STAT_PUBLISHED,			/* readings handed to the MQTT client */
	STAT_PUBLISH_FAILED,		/* readings the MQTT client reported as failed */
	STAT_PUBLISH_QOS0,		/* every publish the MQTT client took, by QoS */
	STAT_PUBLISH_QOS1,
	STAT_PUBLISH_QOS2,
	STAT_DROPPED,			/* notifications, command responses, presence: buffer full */
	STAT_HANDSHAKE_OK,
	STAT_HS_WRONG_KEY,		/* handshake deadline expired after the identity was accepted */
	STAT_HS_UNKNOWN_IDENTITY,	/* identity not in the key store */
	STAT_HS_BAD_CERT,		/* a device certificate that does not verify */
	STAT_HS_DTLS_ERROR,		/* any other DTLS failure during the handshake */
	STAT_NOTIFICATIONS,
	STAT_STALE_NOTIFICATIONS,
	STAT_COMMANDS,			/* command requests sent to devices */
	STAT_COMMAND_ERRORS,
	STAT_BROKER_LOST,		/* broker connection lost */
	STAT_BROKER_RECONNECTS,		/* broker connection back after a loss */
	STAT_UPLOAD_NO_ROUTE,		/* Block1 uploads refused at their first block: no route, */
	STAT_UPLOAD_BUSY,		/* or the device had UPLINK_MAX_UPLOADS in progress */
	STAT_ACKS_FULL,			/* ack: broker readings refused at mqtt.max_pending_acks */
	STAT__COUNT
};

void stats_inc(enum stat_id id);
uint64_t stats_get(enum stat_id id);
const char *stats_name(enum stat_id id);

#endif
