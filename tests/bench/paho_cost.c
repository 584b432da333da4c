/* paho_cost.c: what one QoS 0 publish costs in the MQTT client library alone (Debian's Eclipse
 * Paho MQTT C, the one the gateway links), so the benchmark can show how much of the gateway's CPU
 * per reading is left for DTLS, CoAP and the gateway's own work.
 *
 *   coap2mqtt-paho-cost --uri ssl://127.0.0.1:PORT --cafile CA [--count N] [--shape gateway|bare]
 *       [--version 5|3] [--window W] [--timeout S]
 *
 * Publishes N QoS 0 messages shaped like the benchmark's readings (topic bench/bench-NNNNN/temp,
 * payload "SEQ UNIX-TIME"), each with a completion callback as the gateway sets one; --shape
 * gateway adds the gateway's MQTT 5 user properties (identity, msg-id), bare sends none. At most W
 * are handed over and not yet written (as the gateway's batches are bounded). Prints one line:
 *   "shape=S version=V allocator=A published=N seconds=T cpu_us_per_publish=X caller_us_per_publish=Y"
 * (all threads of the process; the publishing thread alone). Exit 0 when every publish
 * completed, 1 otherwise, 2 on bad arguments. Bounded by --timeout (default 120 s).
 */
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#ifdef C2M_JEMALLOC
#include <jemalloc/jemalloc.h>
#endif
#include <MQTTAsync.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static atomic_long done, failed;
static int connected = -1;	/* -1 waiting, 0 failed, 1 up */
static int waiting;		/* under mu: the publisher sleeps until done moves */

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double cpu_s(clockid_t c)
{
	struct timespec ts;

	clock_gettime(c, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double process_cpu_s(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
	       (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static void set_connected(int v)
{
	pthread_mutex_lock(&mu);
	connected = v;
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
}

static void on_conn_ok(void *ctx, MQTTAsync_successData *r)
{
	(void)ctx;
	(void)r;
	set_connected(1);
}

static void conn_failed(int code)
{
	fprintf(stderr, "paho-cost: connect failed: code %d\n", code);
	set_connected(0);
}

static void on_conn_fail(void *ctx, MQTTAsync_failureData *r)
{
	(void)ctx;
	conn_failed(r ? r->code : 0);
}

static void on_conn_ok5(void *ctx, MQTTAsync_successData5 *r)
{
	(void)r;
	on_conn_ok(ctx, NULL);
}

static void on_conn_fail5(void *ctx, MQTTAsync_failureData5 *r)
{
	(void)ctx;
	conn_failed(r ? r->code : 0);
}

static void completed(int ok)
{
	atomic_fetch_add(ok ? &done : &failed, 1);
	pthread_mutex_lock(&mu);
	if (waiting)
		pthread_cond_signal(&cv);
	pthread_mutex_unlock(&mu);
}

static void on_pub_ok(void *ctx, MQTTAsync_successData *r)
{
	(void)ctx;
	(void)r;
	completed(1);
}

static void on_pub_fail(void *ctx, MQTTAsync_failureData *r)
{
	(void)ctx;
	(void)r;
	completed(0);
}

static void on_pub_ok5(void *ctx, MQTTAsync_successData5 *r)
{
	(void)ctx;
	(void)r;
	completed(1);
}

static void on_pub_fail5(void *ctx, MQTTAsync_failureData5 *r)
{
	(void)ctx;
	(void)r;
	completed(0);
}

/* Waits until at most `left` publishes are outstanding after `sent`, or the deadline. */
static int wait_done(long sent, long left, double deadline)
{
	int ok = 1;

	pthread_mutex_lock(&mu);
	waiting = 1;
	while (sent - atomic_load(&done) - atomic_load(&failed) > left) {
		struct timespec ts;

		if (now_s() > deadline) {
			ok = 0;
			break;
		}
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_nsec += 100000000;
		if (ts.tv_nsec >= 1000000000) {
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000;
		}
		pthread_cond_timedwait(&cv, &mu, &ts);
	}
	waiting = 0;
	pthread_mutex_unlock(&mu);
	return ok;
}

/* The allocator matters as much as the library (see meson.build): the gateway's, named. */
static const char *allocator(void)
{
#ifdef C2M_JEMALLOC
	const char *v = NULL;
	size_t len = sizeof(v);

	if (mallctl("version", &v, &len, NULL, 0) == 0 && v)
		return "jemalloc";
#endif
	return "system";
}

static void usage(void)
{
	fprintf(stderr, "usage: coap2mqtt-paho-cost --uri ssl://HOST:PORT --cafile CA [--count N] "
			"[--shape gateway|bare] [--version 5|3] [--window W] [--timeout S]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "uri", required_argument, NULL, 'u' }, { "cafile", required_argument, NULL, 'c' },
		{ "count", required_argument, NULL, 'n' }, { "shape", required_argument, NULL, 's' },
		{ "version", required_argument, NULL, 'v' },
		{ "window", required_argument, NULL, 'w' },
		{ "refill", required_argument, NULL, 'r' },
		{ "timeout", required_argument, NULL, 't' }, { NULL, 0, NULL, 0 }
	};
	MQTTAsync_createOptions cro = MQTTAsync_createOptions_initializer;
	MQTTAsync_connectOptions co = MQTTAsync_connectOptions_initializer;
	MQTTAsync_SSLOptions ssl = MQTTAsync_SSLOptions_initializer;
	const char *uri = NULL, *ca = NULL, *shape = "gateway";
	long count = 200000, window = 2000, refill = -1, sent;
	int version = 5, timeout = 120, opt, gw, rc;
	double t0, c0, p0, t1, deadline;
	MQTTAsync client;
	char client_id[64];

	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (opt) {
		case 'u': uri = optarg; break;
		case 'c': ca = optarg; break;
		case 'n': count = strtol(optarg, NULL, 10); break;
		case 's': shape = optarg; break;
		case 'v': version = atoi(optarg); break;
		case 'w': window = strtol(optarg, NULL, 10); break;
		case 'r': refill = strtol(optarg, NULL, 10); break;
		case 't': timeout = atoi(optarg); break;
		default: usage();
		}
	}
	gw = strcmp(shape, "gateway") == 0;
	if (refill < 0)
		refill = window / 2;
	if (!uri || !ca || count < 1 || count > 100000000 || window < 1 || window > 1000000 ||
	    (version != 5 && version != 3) || (!gw && strcmp(shape, "bare") != 0) || timeout < 1)
		usage();
	deadline = now_s() + timeout;
	snprintf(client_id, sizeof(client_id), "paho-cost-%ld", (long)getpid());
	cro.MQTTVersion = version == 5 ? MQTTVERSION_5 : MQTTVERSION_3_1_1;
	/* as the gateway creates its client: Paho counts what it holds against this limit */
	cro.sendWhileDisconnected = 1;
	cro.maxBufferedMessages = (int)window + 1;
	if (MQTTAsync_createWithOptions(&client, uri, client_id, MQTTCLIENT_PERSISTENCE_NONE, NULL,
					&cro) != MQTTASYNC_SUCCESS) {
		fprintf(stderr, "paho-cost: cannot create a client for %s\n", uri);
		return 1;
	}
	ssl.trustStore = ca;
	ssl.enableServerCertAuth = 1;
	ssl.verify = 1;
	ssl.sslVersion = MQTT_SSL_VERSION_TLS_1_2;
	co.ssl = &ssl;
	co.keepAliveInterval = 30;
	if (version == 5) {
		MQTTAsync_connectOptions c5 = MQTTAsync_connectOptions_initializer5;

		c5.ssl = &ssl;
		c5.keepAliveInterval = 30;
		c5.cleanstart = 1;
		c5.onSuccess5 = on_conn_ok5;
		c5.onFailure5 = on_conn_fail5;
		co = c5;
	} else {
		co.cleansession = 1;
		co.MQTTVersion = MQTTVERSION_3_1_1;
		co.onSuccess = on_conn_ok;
		co.onFailure = on_conn_fail;
	}
	if (MQTTAsync_connect(client, &co) != MQTTASYNC_SUCCESS) {
		fprintf(stderr, "paho-cost: connect refused by the client\n");
		return 1;
	}
	pthread_mutex_lock(&mu);
	while (connected < 0 && now_s() < deadline) {
		struct timespec ts;

		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_sec += 1;
		pthread_cond_timedwait(&cv, &mu, &ts);
	}
	pthread_mutex_unlock(&mu);
	if (connected != 1) {
		fprintf(stderr, "paho-cost: not connected to %s\n", uri);
		return 1;
	}

	t0 = now_s();
	c0 = cpu_s(CLOCK_THREAD_CPUTIME_ID);
	p0 = process_cpu_s();
	for (sent = 0; sent < count; sent++) {
		MQTTAsync_message msg = MQTTAsync_message_initializer;
		MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;
		MQTTProperty pr[2];
		MQTTProperties props = MQTTProperties_initializer;
		char topic[64], payload[48], identity[16], msgid[48];

		if (sent - atomic_load(&done) - atomic_load(&failed) >= window &&
		    !wait_done(sent, refill, deadline))
			break;
		snprintf(identity, sizeof(identity), "bench-%05ld", sent % 20000);
		snprintf(topic, sizeof(topic), "bench/%s/temp", identity);
		msg.payloadlen = snprintf(payload, sizeof(payload), "%ld %.6f", sent / 20000,
					  cpu_s(CLOCK_REALTIME));
		msg.payload = payload;
		msg.qos = 0;
		if (version == 5 && gw) {
			/* the gateway's two user properties, built the way it builds them */
			snprintf(msgid, sizeof(msgid), "18a3f0c2d4e5-%ld", sent + 1);
			pr[0] = (MQTTProperty){ .identifier = MQTTPROPERTY_CODE_USER_PROPERTY };
			pr[0].value.data.data = "identity";
			pr[0].value.data.len = 8;
			pr[0].value.value.data = identity;
			pr[0].value.value.len = (int)strlen(identity);
			pr[1] = (MQTTProperty){ .identifier = MQTTPROPERTY_CODE_USER_PROPERTY };
			pr[1].value.data.data = "msg-id";
			pr[1].value.data.len = 6;
			pr[1].value.value.data = msgid;
			pr[1].value.value.len = (int)strlen(msgid);
			props.array = pr;
			props.count = props.max_count = 2;
			props.length = 2 * (1 + 2 + 2) + 8 + pr[0].value.value.len + 6 +
				       pr[1].value.value.len;
			msg.properties = props;
		}
		if (version == 5) {
			ro.onSuccess5 = on_pub_ok5;
			ro.onFailure5 = on_pub_fail5;
		} else {
			ro.onSuccess = on_pub_ok;
			ro.onFailure = on_pub_fail;
		}
		rc = MQTTAsync_sendMessage(client, topic, &msg, &ro);
		if (rc != MQTTASYNC_SUCCESS) {
			fprintf(stderr, "paho-cost: publish %ld refused: code %d\n", sent, rc);
			break;
		}
	}
	wait_done(sent, 0, deadline);
	t1 = now_s();
	printf("shape=%s version=%d allocator=%s published=%ld seconds=%.3f cpu_us_per_publish=%.2f "
	       "caller_us_per_publish=%.2f\n", gw ? "gateway" : "bare", version, allocator(),
	       (long)atomic_load(&done),
	       t1 - t0, (process_cpu_s() - p0) * 1e6 / (double)(sent ? sent : 1),
	       (cpu_s(CLOCK_THREAD_CPUTIME_ID) - c0) * 1e6 / (double)(sent ? sent : 1));
	MQTTAsync_disconnect(client, NULL);
	MQTTAsync_destroy(&client);
	return atomic_load(&done) == count && atomic_load(&failed) == 0 ? 0 : 1;
}
