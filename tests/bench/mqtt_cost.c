/* mqtt_cost.c: what one QoS 0 publish costs in an MQTT client library alone: Debian's Eclipse Paho
 * MQTT C (the one the gateway links) and, when built with it, Debian's libmosquitto for comparison,
 * so the benchmark can show how much of the gateway's CPU per reading is left for DTLS, CoAP and
 * the gateway's own work, and what another client would leave.
 *
 *   coap2mqtt-mqtt-cost --uri ssl://127.0.0.1:PORT --cafile CA [--client paho|mosquitto]
 *       [--count N] [--shape gateway|bare] [--version 5|3] [--window W] [--refill R] [--timeout S]
 *
 * Publishes N QoS 0 messages shaped like the benchmark's readings (topic bench/bench-NNNNN/temp,
 * payload "SEQ UNIX-TIME"); --shape gateway adds the gateway's MQTT 5 user properties (identity,
 * msg-id), bare sends none. At most W are handed over and not yet written (as the gateway's
 * batches are bounded); the next ones once no more than R are left.
 *   paho: MQTTAsync as the gateway uses it, each publish with a completion callback; Paho's own
 *         threads write.
 *   mosquitto: libmosquitto without its thread, as an event loop would drive it: each publish is
 *         written by the calling thread when the socket takes it, the rest by mosquitto_loop()
 *         once the window is full; a publish is done when libmosquitto reports it written.
 * Prints one line:
 *   "client=C shape=S version=V allocator=A published=N seconds=T cpu_us_per_publish=X
 *    caller_us_per_publish=Y"
 * (all threads of the process; the publishing thread alone). Exit 0 when every publish
 * completed, 1 otherwise, 2 on bad arguments (or a client this build lacks). Bounded by --timeout
 * (default 120 s).
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
#ifdef C2M_MOSQUITTO
#include <mosquitto.h>
#include <mqtt_protocol.h>
#endif

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
	fprintf(stderr, "mqtt-cost: connect failed: code %d\n", code);
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
	fprintf(stderr, "usage: coap2mqtt-mqtt-cost --uri ssl://HOST:PORT --cafile CA "
			"[--client paho|mosquitto] [--count N] [--shape gateway|bare] [--version 5|3] "
			"[--window W] [--refill R] [--timeout S]\n");
	exit(2);
}

/* What both clients are asked to do, and one reading as the benchmark's devices send it. */
struct job {
	const char *uri, *ca;
	long count, window, refill;
	int version, gw;
	double deadline;
	/* wall, publishing thread and process CPU at the first publish and after the last */
	double t0, c0, p0, t1, c1, p1;
};

static void mark(struct job *j, int end)
{
	double t = now_s(), c = cpu_s(CLOCK_THREAD_CPUTIME_ID), p = process_cpu_s();

	if (end) {
		j->t1 = t;
		j->c1 = c;
		j->p1 = p;
	} else {
		j->t0 = t;
		j->c0 = c;
		j->p0 = p;
	}
}

struct reading {
	char topic[64], payload[48], identity[16], msgid[48];
	int payloadlen;
};

static void shape_reading(long n, struct reading *r)
{
	snprintf(r->identity, sizeof(r->identity), "bench-%05ld", n % 20000);
	snprintf(r->topic, sizeof(r->topic), "bench/%s/temp", r->identity);
	r->payloadlen = snprintf(r->payload, sizeof(r->payload), "%ld %.6f", n / 20000,
				 cpu_s(CLOCK_REALTIME));
	/* as the gateway makes a msg-id: its start time in hex, then a counter */
	snprintf(r->msgid, sizeof(r->msgid), "18a3f0c2d4e5-%ld", n + 1);
}

/* Paho MQTTAsync as the gateway drives it. Returns the number of publishes handed over. */
static long run_paho(struct job *j)
{
	MQTTAsync_createOptions cro = MQTTAsync_createOptions_initializer;
	MQTTAsync_connectOptions co = MQTTAsync_connectOptions_initializer;
	MQTTAsync_SSLOptions ssl = MQTTAsync_SSLOptions_initializer;
	MQTTAsync client;
	char client_id[64];
	long sent;
	int rc;

	snprintf(client_id, sizeof(client_id), "mqtt-cost-%ld", (long)getpid());
	cro.MQTTVersion = j->version == 5 ? MQTTVERSION_5 : MQTTVERSION_3_1_1;
	/* as the gateway creates its client: Paho counts what it holds against this limit */
	cro.sendWhileDisconnected = 1;
	cro.maxBufferedMessages = (int)j->window + 1;
	if (MQTTAsync_createWithOptions(&client, j->uri, client_id, MQTTCLIENT_PERSISTENCE_NONE,
					NULL, &cro) != MQTTASYNC_SUCCESS) {
		fprintf(stderr, "mqtt-cost: cannot create a client for %s\n", j->uri);
		return -1;
	}
	ssl.trustStore = j->ca;
	ssl.enableServerCertAuth = 1;
	ssl.verify = 1;
	ssl.sslVersion = MQTT_SSL_VERSION_TLS_1_2;
	co.ssl = &ssl;
	co.keepAliveInterval = 30;
	if (j->version == 5) {
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
		fprintf(stderr, "mqtt-cost: connect refused by the client\n");
		MQTTAsync_destroy(&client);
		return -1;
	}
	pthread_mutex_lock(&mu);
	while (connected < 0 && now_s() < j->deadline) {
		struct timespec ts;

		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_sec += 1;
		pthread_cond_timedwait(&cv, &mu, &ts);
	}
	pthread_mutex_unlock(&mu);
	if (connected != 1) {
		fprintf(stderr, "mqtt-cost: not connected to %s\n", j->uri);
		MQTTAsync_destroy(&client);
		return -1;
	}

	mark(j, 0);
	for (sent = 0; sent < j->count; sent++) {
		MQTTAsync_message msg = MQTTAsync_message_initializer;
		MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;
		MQTTProperty pr[2];
		MQTTProperties props = MQTTProperties_initializer;
		struct reading r;

		if (sent - atomic_load(&done) - atomic_load(&failed) >= j->window &&
		    !wait_done(sent, j->refill, j->deadline))
			break;
		shape_reading(sent, &r);
		msg.payloadlen = r.payloadlen;
		msg.payload = r.payload;
		msg.qos = 0;
		if (j->version == 5 && j->gw) {
			/* the gateway's two user properties, built the way it builds them */
			pr[0] = (MQTTProperty){ .identifier = MQTTPROPERTY_CODE_USER_PROPERTY };
			pr[0].value.data.data = "identity";
			pr[0].value.data.len = 8;
			pr[0].value.value.data = r.identity;
			pr[0].value.value.len = (int)strlen(r.identity);
			pr[1] = (MQTTProperty){ .identifier = MQTTPROPERTY_CODE_USER_PROPERTY };
			pr[1].value.data.data = "msg-id";
			pr[1].value.data.len = 6;
			pr[1].value.value.data = r.msgid;
			pr[1].value.value.len = (int)strlen(r.msgid);
			props.array = pr;
			props.count = props.max_count = 2;
			props.length = 2 * (1 + 2 + 2) + 8 + pr[0].value.value.len + 6 +
				       pr[1].value.value.len;
			msg.properties = props;
		}
		if (j->version == 5) {
			ro.onSuccess5 = on_pub_ok5;
			ro.onFailure5 = on_pub_fail5;
		} else {
			ro.onSuccess = on_pub_ok;
			ro.onFailure = on_pub_fail;
		}
		rc = MQTTAsync_sendMessage(client, r.topic, &msg, &ro);
		if (rc != MQTTASYNC_SUCCESS) {
			fprintf(stderr, "mqtt-cost: publish %ld refused: code %d\n", sent, rc);
			break;
		}
	}
	wait_done(sent, 0, j->deadline);
	mark(j, 1);
	MQTTAsync_disconnect(client, NULL);
	MQTTAsync_destroy(&client);
	return sent;
}

#ifdef C2M_MOSQUITTO
static void mosq_on_connect(struct mosquitto *m, void *ctx, int rc)
{
	(void)m;
	(void)ctx;
	if (rc != 0)
		fprintf(stderr, "mqtt-cost: connect refused by the broker: %s\n",
			mosquitto_connack_string(rc));
	connected = rc == 0;
}

static void mosq_on_publish(struct mosquitto *m, void *ctx, int mid)
{
	(void)m;
	(void)ctx;
	(void)mid;
	atomic_fetch_add(&done, 1);
}

/* Runs libmosquitto's loop until at most `left` publishes are unwritten, or the deadline. */
static int mosq_drain(struct mosquitto *m, long sent, long left, double deadline)
{
	while (sent - atomic_load(&done) > left) {
		int rc = mosquitto_loop(m, 100, 1);

		if (rc != MOSQ_ERR_SUCCESS) {
			fprintf(stderr, "mqtt-cost: connection lost: %s\n", mosquitto_strerror(rc));
			return 0;
		}
		if (now_s() > deadline)
			return 0;
	}
	return 1;
}

/* libmosquitto driven from one thread, as the gateway's event loop would drive it. */
static long run_mosquitto(struct job *j)
{
	char host[256];
	const char *hp, *colon = NULL;
	struct mosquitto *m;
	long sent = -1;
	int port = 0;

	/* the prefix first: a shorter --uri has nothing past where the host would start */
	if (strncmp(j->uri, "ssl://", 6) == 0) {
		hp = j->uri + 6;
		colon = strrchr(hp, ':');
	}
	if (!colon || (size_t)(colon - hp) >= sizeof(host) || (port = atoi(colon + 1)) < 1 ||
	    port > 65535) {
		fprintf(stderr, "mqtt-cost: --client mosquitto wants --uri ssl://HOST:PORT\n");
		return -1;
	}
	memcpy(host, hp, (size_t)(colon - hp));
	host[colon - hp] = '\0';
	mosquitto_lib_init();
	m = mosquitto_new(NULL, true, NULL);
	if (!m) {
		fprintf(stderr, "mqtt-cost: cannot create a libmosquitto client\n");
		goto out;
	}
	mosquitto_int_option(m, MOSQ_OPT_PROTOCOL_VERSION,
			     j->version == 5 ? MQTT_PROTOCOL_V5 : MQTT_PROTOCOL_V311);
	mosquitto_connect_callback_set(m, mosq_on_connect);
	mosquitto_publish_callback_set(m, mosq_on_publish);
	/* verifies the broker's certificate and its name against HOST, as the gateway does */
	if (mosquitto_tls_set(m, j->ca, NULL, NULL, NULL, NULL) != MOSQ_ERR_SUCCESS ||
	    mosquitto_tls_opts_set(m, 1, "tlsv1.2", NULL) != MOSQ_ERR_SUCCESS) {
		fprintf(stderr, "mqtt-cost: libmosquitto refused the TLS settings\n");
		goto out;
	}
	if (mosquitto_connect(m, host, port, 30) != MOSQ_ERR_SUCCESS) {
		fprintf(stderr, "mqtt-cost: cannot connect to %s\n", j->uri);
		goto out;
	}
	while (connected < 0 && now_s() < j->deadline)
		if (mosquitto_loop(m, 100, 1) != MOSQ_ERR_SUCCESS)
			break;
	if (connected != 1) {
		fprintf(stderr, "mqtt-cost: not connected to %s\n", j->uri);
		goto out;
	}
	mark(j, 0);
	for (sent = 0; sent < j->count; sent++) {
		mosquitto_property *props = NULL;
		struct reading r;
		int rc;

		if (sent - atomic_load(&done) >= j->window &&
		    !mosq_drain(m, sent, j->refill, j->deadline))
			break;
		shape_reading(sent, &r);
		if (j->version == 5 && j->gw &&
		    (mosquitto_property_add_string_pair(&props, MQTT_PROP_USER_PROPERTY, "identity",
							r.identity) != MOSQ_ERR_SUCCESS ||
		     mosquitto_property_add_string_pair(&props, MQTT_PROP_USER_PROPERTY, "msg-id",
							r.msgid) != MOSQ_ERR_SUCCESS)) {
			mosquitto_property_free_all(&props);
			fprintf(stderr, "mqtt-cost: out of memory\n");
			break;
		}
		rc = mosquitto_publish_v5(m, NULL, r.topic, r.payloadlen, r.payload, 0, false, props);
		mosquitto_property_free_all(&props);
		if (rc != MOSQ_ERR_SUCCESS) {
			fprintf(stderr, "mqtt-cost: publish %ld refused: %s\n", sent,
				mosquitto_strerror(rc));
			break;
		}
	}
	mosq_drain(m, sent, 0, j->deadline);
	mark(j, 1);
	mosquitto_disconnect(m);
out:
	mosquitto_destroy(m);
	mosquitto_lib_cleanup();
	return sent;
}
#endif

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "uri", required_argument, NULL, 'u' }, { "cafile", required_argument, NULL, 'c' },
		{ "client", required_argument, NULL, 'C' },
		{ "count", required_argument, NULL, 'n' }, { "shape", required_argument, NULL, 's' },
		{ "version", required_argument, NULL, 'v' },
		{ "window", required_argument, NULL, 'w' },
		{ "refill", required_argument, NULL, 'r' },
		{ "timeout", required_argument, NULL, 't' }, { NULL, 0, NULL, 0 }
	};
	struct job j = { .count = 200000, .window = 2000, .refill = -1, .version = 5 };
	const char *shape = "gateway", *client = "paho";
	int timeout = 120, opt;
	long sent;

	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (opt) {
		case 'u': j.uri = optarg; break;
		case 'c': j.ca = optarg; break;
		case 'C': client = optarg; break;
		case 'n': j.count = strtol(optarg, NULL, 10); break;
		case 's': shape = optarg; break;
		case 'v': j.version = atoi(optarg); break;
		case 'w': j.window = strtol(optarg, NULL, 10); break;
		case 'r': j.refill = strtol(optarg, NULL, 10); break;
		case 't': timeout = atoi(optarg); break;
		default: usage();
		}
	}
	j.gw = strcmp(shape, "gateway") == 0;
	if (j.refill < 0)
		j.refill = j.window / 2;
	if (!j.uri || !j.ca || j.count < 1 || j.count > 100000000 || j.window < 1 ||
	    j.window > 1000000 || j.refill >= j.window || (j.version != 5 && j.version != 3) ||
	    (!j.gw && strcmp(shape, "bare") != 0) || timeout < 1 || timeout > 3600)
		usage();
#ifndef C2M_MOSQUITTO
	if (strcmp(client, "mosquitto") == 0) {
		fprintf(stderr, "mqtt-cost: built without libmosquitto (libmosquitto-dev)\n");
		return 2;
	}
#endif
	if (strcmp(client, "paho") != 0 && strcmp(client, "mosquitto") != 0)
		usage();
	j.deadline = now_s() + timeout;

#ifdef C2M_MOSQUITTO
	if (client[0] == 'm')
		sent = run_mosquitto(&j);
	else
#endif
		sent = run_paho(&j);
	if (sent < 0)
		return 1;
	printf("client=%s shape=%s version=%d allocator=%s published=%ld seconds=%.3f "
	       "cpu_us_per_publish=%.2f caller_us_per_publish=%.2f\n", client,
	       j.gw ? "gateway" : "bare", j.version, allocator(), (long)atomic_load(&done),
	       j.t1 - j.t0, (j.p1 - j.p0) * 1e6 / (double)(sent ? sent : 1),
	       (j.c1 - j.c0) * 1e6 / (double)(sent ? sent : 1));
	return atomic_load(&done) == j.count && atomic_load(&failed) == 0 ? 0 : 1;
}
