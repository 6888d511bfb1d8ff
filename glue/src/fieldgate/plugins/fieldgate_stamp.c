/*
 * fieldgate_stamp: a Mosquitto 2.0 plugin that stamps every PUBLISH the broker receives with
 * the MQTT v5 user property
 *
 *     fg-ts = <arrival time, UTC epoch milliseconds, decimal>
 *
 * so that a reading without a timestamp of its own carries the moment it reached the gateway's
 * broker, not the moment the collector got to it, and carries the same stamp every time the
 * broker delivers that message again (queued for an offline session, saved by persistence,
 * resent with DUP after a subscriber left without acknowledging).
 *
 * Stamps are strictly increasing per topic: when the clock gives a value at or below the last
 * stamp given on that topic, the stamp is last + 1. Two messages of one device in the same
 * millisecond therefore get distinct stamps, and (device, ts, metric) stays unique.
 *
 * Memory is fixed: the last stamps live in a table of `slots` 64-bit counters indexed by a hash
 * of the topic (plugin_opt_slots, a power of two, default 16384 = 128 KiB). Topics beyond the
 * table size share counters. Sharing never breaks the guarantee (a topic's stamps are a
 * subsequence of its counter's strictly increasing sequence); it costs only accuracy when
 * topics of one counter receive messages in the same millisecond (each later one is pushed
 * 1 ms ahead). A counter runs ahead of the clock only while its topics together receive more
 * than 1000 messages per second; the broker log says so (at most once a minute).
 *
 * A client cannot forge the stamp: every fg-ts user property a client sent is removed before
 * the broker's own is appended (the other properties keep their order and values). If that
 * cannot be done (out of memory), the message is refused unacknowledged and the publisher
 * sends it again: never passed on with a client's stamp, never passed on unstamped.
 *
 * Loaded with the configuration line
 *
 *     plugin /path/to/fieldgate_stamp.so
 *
 * (Mosquitto 2.0.x reads `plugin` and `auth_plugin` the same way; with per_listener_settings
 * true it must follow each listener that devices publish to).
 *
 * Build: `fieldgate broker-conf` builds it when no prebuilt copy exists (fieldgate/broker.py:
 * gcc -O2 -fPIC -shared, with Debian's mosquitto-dev and libmosquitto-dev headers). Do not
 * link it against libmosquitto: the broker itself exports the mosquitto_* functions.
 */

#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>
#include <mqtt_protocol.h>

#ifndef FG_STAMP_BUILD
#define FG_STAMP_BUILD "unversioned"
#endif
/* fieldgate broker-conf finds this string in a prebuilt .so to tell which source it came from. */
static const char fg_build[] = "fieldgate_stamp build " FG_STAMP_BUILD;

#define FG_PROPERTY "fg-ts"
#define FG_DEFAULT_SLOTS 16384u
#define FG_MAX_SLOTS (1u << 24)
#define FG_WARN_AHEAD_MS 1000
#define FG_WARN_EVERY_MS 60000

struct fg_state {
	mosquitto_plugin_id_t *pid;
	uint64_t *last;            /* last stamp per slot, 0 = never used */
	uint32_t mask;             /* slots - 1 */
	int64_t next_ahead_warning;
	int64_t next_forged_warning;
	uint64_t forged;           /* client-supplied fg-ts properties removed so far */
};

static struct fg_state fg;

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* FNV-1a, 64 bit: topics are short; any reasonable spread will do. */
static uint64_t topic_hash(const char *topic)
{
	uint64_t h = 14695981039346656037ULL;

	for(const unsigned char *c = (const unsigned char *)topic; *c; c++){
		h ^= *c;
		h *= 1099511628211ULL;
	}
	return h;
}

/* Decimal digits of v into buf (at least 21 bytes). snprintf would cost ~870 instructions a
 * message (callgrind), more than the rest of the stamping together. */
static void format_ms(char *buf, int64_t v)
{
	char tmp[24];
	int n = 0;
	uint64_t u;

	if(v < 0){
		*buf++ = '-';
		u = (uint64_t)0 - (uint64_t)v;
	}else{
		u = (uint64_t)v;
	}
	do{
		tmp[n++] = (char)('0' + u % 10);
		u /= 10;
	}while(u);
	while(n) *buf++ = tmp[--n];
	*buf = '\0';
}

/* Copy one property onto *dst. Mosquitto 2.0 keeps only these on a stored PUBLISH (payload
 * format, content type, response topic, correlation data, user properties; expiry for
 * good measure); another kind would be a newer broker, and is reported, not dropped. */
static int copy_property(mosquitto_property **dst, const mosquitto_property *p)
{
	int id = mosquitto_property_identifier(p);
	int rc;

	switch(id){
		case MQTT_PROP_PAYLOAD_FORMAT_INDICATOR: {
			uint8_t v;
			if(!mosquitto_property_read_byte(p, id, &v, false)) return MOSQ_ERR_INVAL;
			return mosquitto_property_add_byte(dst, id, v);
		}
		case MQTT_PROP_MESSAGE_EXPIRY_INTERVAL: {
			uint32_t v;
			if(!mosquitto_property_read_int32(p, id, &v, false)) return MOSQ_ERR_INVAL;
			return mosquitto_property_add_int32(dst, id, v);
		}
		case MQTT_PROP_CONTENT_TYPE:
		case MQTT_PROP_RESPONSE_TOPIC: {
			char *s = NULL;
			if(!mosquitto_property_read_string(p, id, &s, false)) return MOSQ_ERR_NOMEM;
			rc = mosquitto_property_add_string(dst, id, s);
			free(s);
			return rc;
		}
		case MQTT_PROP_CORRELATION_DATA: {
			void *v = NULL;
			uint16_t len = 0;
			if(!mosquitto_property_read_binary(p, id, &v, &len, false)) return MOSQ_ERR_NOMEM;
			rc = mosquitto_property_add_binary(dst, id, v, len);
			free(v);
			return rc;
		}
		case MQTT_PROP_USER_PROPERTY: {
			char *name = NULL, *value = NULL;
			if(!mosquitto_property_read_string_pair(p, id, &name, &value, false)) return MOSQ_ERR_NOMEM;
			rc = mosquitto_property_add_string_pair(dst, id, name, value);
			free(name);
			free(value);
			return rc;
		}
		default:
			return MOSQ_ERR_NOT_SUPPORTED;
	}
}

/* Is p a user property named fg-ts? (reads the name only) */
static int is_stamp(const mosquitto_property *p, int *forged)
{
	char *name = NULL;

	*forged = 0;
	if(mosquitto_property_identifier(p) != MQTT_PROP_USER_PROPERTY) return MOSQ_ERR_SUCCESS;
	if(!mosquitto_property_read_string_pair(p, MQTT_PROP_USER_PROPERTY, &name, NULL, false)){
		return MOSQ_ERR_NOMEM;
	}
	*forged = strcmp(name, FG_PROPERTY) == 0;
	free(name);
	return MOSQ_ERR_SUCCESS;
}

/* Remove every fg-ts user property a client sent; count how many. */
static int strip_forged(mosquitto_property **props, int *removed)
{
	const mosquitto_property *p;
	mosquitto_property *clean = NULL;
	int forged, rc;

	*removed = 0;
	for(p = *props; p; p = mosquitto_property_next(p)){
		rc = is_stamp(p, &forged);
		if(rc) return rc;
		*removed += forged;
	}
	if(*removed == 0) return MOSQ_ERR_SUCCESS;

	for(p = *props; p; p = mosquitto_property_next(p)){
		rc = is_stamp(p, &forged);
		if(!rc && !forged) rc = copy_property(&clean, p);
		if(rc){
			mosquitto_property_free_all(&clean);
			return rc;
		}
	}
	mosquitto_property_free_all(props);
	*props = clean;
	return MOSQ_ERR_SUCCESS;
}

static int on_message(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_message *ed = event_data;
	struct fg_state *st = userdata;
	uint64_t *last;
	int64_t now, stamp;
	int removed = 0;
	int rc;
	char value[24];

	(void)event;
	now = now_ms();
	last = &st->last[topic_hash(ed->topic) & st->mask];
	stamp = now > (int64_t)*last ? now : (int64_t)*last + 1;
	*last = (uint64_t)stamp;

	if(ed->properties){
		rc = strip_forged(&ed->properties, &removed);
		if(rc){
			/* Refused rather than passed on with a client's fg-ts: the broker drops the
			 * connection without acknowledging, and the publisher sends the message again. */
			mosquitto_log_printf(MOSQ_LOG_ERR,
					"fieldgate_stamp: could not remove a client-supplied " FG_PROPERTY " from a message on '%s' (error %d); message refused",
					ed->topic, rc);
			return rc;
		}
		if(removed){
			st->forged += (uint64_t)removed;
			if(now >= st->next_forged_warning){
				st->next_forged_warning = now + FG_WARN_EVERY_MS;
				mosquitto_log_printf(MOSQ_LOG_WARNING,
						"fieldgate_stamp: removed a client-supplied " FG_PROPERTY " property from client '%s' on '%s' (%" PRIu64 " since start)",
						mosquitto_client_id(ed->client), ed->topic, st->forged);
			}
		}
	}
	if(stamp - now > FG_WARN_AHEAD_MS && now >= st->next_ahead_warning){
		st->next_ahead_warning = now + FG_WARN_EVERY_MS;
		mosquitto_log_printf(MOSQ_LOG_WARNING,
				"fieldgate_stamp: stamps on '%s' run %" PRId64 " ms ahead of the clock (more than 1000 messages a second on it, or the clock stepped back)",
				ed->topic, stamp - now);
	}

	format_ms(value, stamp);
	rc = mosquitto_property_add_string_pair(&ed->properties, MQTT_PROP_USER_PROPERTY, FG_PROPERTY, value);
	if(rc){
		/* Only out of memory: refused (not acknowledged), so the publisher sends it again. */
		mosquitto_log_printf(MOSQ_LOG_ERR,
				"fieldgate_stamp: could not stamp a message on '%s' (error %d); message refused", ed->topic, rc);
	}
	return rc;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

static int parse_slots(const char *text, uint32_t *slots)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(text, &end, 10);
	if(errno || end == text || *end || v == 0 || v > FG_MAX_SLOTS || (v & (v - 1))){
		return MOSQ_ERR_INVAL;
	}
	*slots = (uint32_t)v;
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **user_data,
		struct mosquitto_opt *opts, int opt_count)
{
	uint32_t slots = FG_DEFAULT_SLOTS;
	int rc;

	for(int i = 0; i < opt_count; i++){
		if(!strcmp(opts[i].key, "slots")){
			if(parse_slots(opts[i].value, &slots)){
				mosquitto_log_printf(MOSQ_LOG_ERR,
						"fieldgate_stamp: plugin_opt_slots must be a power of two from 1 to %u, not '%s'",
						FG_MAX_SLOTS, opts[i].value);
				return MOSQ_ERR_INVAL;
			}
		}else{
			mosquitto_log_printf(MOSQ_LOG_ERR,
					"fieldgate_stamp: unknown option plugin_opt_%s (known: plugin_opt_slots)", opts[i].key);
			return MOSQ_ERR_INVAL;
		}
	}

	memset(&fg, 0, sizeof(fg));
	fg.last = mosquitto_calloc(slots, sizeof(uint64_t));
	if(!fg.last) return MOSQ_ERR_NOMEM;
	fg.mask = slots - 1;
	fg.pid = identifier;
	rc = mosquitto_callback_register(identifier, MOSQ_EVT_MESSAGE, on_message, NULL, &fg);
	if(rc){
		mosquitto_free(fg.last);
		fg.last = NULL;
		return rc;
	}
	*user_data = &fg;
	mosquitto_log_printf(MOSQ_LOG_INFO,
			"%s: stamping every incoming message with " FG_PROPERTY " (%u slots, %zu bytes)",
			fg_build, slots, (size_t)slots * sizeof(uint64_t));
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_cleanup(void *user_data, struct mosquitto_opt *opts, int opt_count)
{
	struct fg_state *st = user_data;

	(void)opts;
	(void)opt_count;
	if(!st) return MOSQ_ERR_SUCCESS;
	mosquitto_callback_unregister(st->pid, MOSQ_EVT_MESSAGE, on_message, NULL);
	mosquitto_free(st->last);
	st->last = NULL;
	return MOSQ_ERR_SUCCESS;
}
