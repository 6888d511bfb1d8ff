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
 * Prompt saves (issue 15): Mosquitto saves its persistence database either every N changes
 * (autosave_on_changes true: up to N - 1 acknowledged messages lost by a killed broker, and
 * every save rewrites the whole backlog, so a long collector outage turns into a write storm)
 * or every autosave_interval + 1 whole seconds whether or not anything changed. The plugin
 * asks for a save the way mosquitto(8) documents, SIGUSR1, when a message arrived since the
 * last save and at least plugin_opt_save_ms (default 500; 0: never) have passed since the
 * last request: on the message itself or on the broker's next loop pass (MOSQ_EVT_TICK, at
 * least every 100 ms). The broker writes the database at the end of that pass. A broker killed
 * therefore loses at most the messages of the last save_ms plus one save; an idle broker writes
 * nothing. When one save takes long (a large backlog on slow storage), the next waits twice
 * that long, so saving never takes more than a third of the broker's time.
 *
 * Refusals (issue 15): Mosquitto acknowledges a PUBLISH its ACL denies and drops it, and says
 * so only in its debug log (every packet). With plugin_opt_refusals_file PATH the plugin counts
 * them per account (the first 256 accounts by name, the rest together) and writes the counts as
 * JSON to PATH (written to PATH.tmp, renamed; mode 0644; at most once a second, only after a
 * change; `fieldgate status` reads it). It learns the outcome by registering an ACL check that
 * decides nothing (MOSQ_ERR_PLUGIN_DEFER, so the acl_file decides: it needs one, as the role
 * writes; without an acl_file every check deferred is a denial) and is asked first: a PUBLISH
 * that passes is followed at once by its message event; one that is not is a denial. The
 * write checks that are not a client's PUBLISH are told apart: a will (checked right after the
 * client's disconnect event) and the source of a retained message (checked right after a
 * subscription's check).
 *
 * Protocol errors (issue 15): a client that breaks the protocol (a malformed packet, a packet
 * out of place such as a second CONNECT, an oversize packet) is disconnected, and Mosquitto
 * 2.0.11 tells a plugin nothing about why: its MOSQ_EVT_DISCONNECT always carries reason -1
 * (src/context.c, context__disconnect: plugin__handle_disconnect(context, -1)). The reason is
 * only in the notice do_disconnect (src/loop.c) logs just before, "Client <id> disconnected due
 * to malformed packet." and the like. With plugin_opt_broker_log PATH (the broker's `log_dest
 * file`, with `log_type notice` and `connection_messages true`) the plugin reads that log from
 * where it stood at start: in its disconnect event the line naming the reason is the last one
 * written (the broker is one thread and writes its log line-buffered), so it counts the error
 * under the disconnecting client's account and address, the source the client sent the packet
 * from even when it never logged in. It checks once that its own start notice reached PATH
 * (else the counts say the log is not the broker's) and, as the broker reopens its log only
 * when it reloads (logrotate's postrotate), finishes the old file and opens PATH again on the
 * tick after a reload. The counts are in the refusals file, beside the denials (the first 256
 * sources, the rest together).
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
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/stat.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

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
#define FG_DEFAULT_SAVE_MS 500
#define FG_MAX_ACCOUNTS 256
#define FG_NAME_MAX 64
#define FG_TOPIC_MAX 128
#define FG_REFUSALS_EVERY_MS 1000
#define FG_MAX_SAVE_MS 3600000
#define FG_MAX_SLOTS (1u << 24)
#define FG_WARN_AHEAD_MS 1000
#define FG_WARN_EVERY_MS 60000
#define FG_ADDRESS_MAX 64
#define FG_LINE_MAX 1024

struct fg_refusal {
	char account[FG_NAME_MAX + 1];   /* username ("" for none) */
	char client[FG_NAME_MAX + 1];    /* the last client id it used */
	char topic[FG_TOPIC_MAX + 1];    /* the last topic denied */
	uint64_t denied;
	int64_t last_ms;
};

/* Connections dropped for protocol errors, per source: the account, or before a login the
 * address (or, for a line whose disconnect event the plugin did not get, the client id). */
struct fg_proto {
	char source[FG_NAME_MAX + 1];
	char account[FG_NAME_MAX + 1];   /* "" before a login */
	char client[FG_NAME_MAX + 1];
	char address[FG_ADDRESS_MAX + 1];
	char kind[FG_NAME_MAX + 1];      /* the last error, in the broker's words */
	uint64_t errors;
	int64_t last_ms;
};

/* The broker's log as the plugin reads it. */
enum fg_log_state { FG_LOG_OFF, FG_LOG_CHECKING, FG_LOG_READING, FG_LOG_FOREIGN, FG_LOG_UNREADABLE };

/* A write check waiting for its outcome. */
struct fg_pending {
	const struct mosquitto *client;  /* compared, never dereferenced */
	char account[FG_NAME_MAX + 1];
	char client_id[FG_NAME_MAX + 1];
	char topic[FG_TOPIC_MAX + 1];
	int active;
};

struct fg_state {
	mosquitto_plugin_id_t *pid;
	uint64_t *last;            /* last stamp per slot, 0 = never used */
	uint32_t mask;             /* slots - 1 */
	int64_t next_ahead_warning;
	int64_t next_forged_warning;
	uint64_t forged;           /* client-supplied fg-ts properties removed so far */
	int64_t save_ms;           /* least time between save requests; 0 = none */
	int dirty;                 /* a message arrived since the last save request */
	int64_t requested;         /* when the last save was requested (CLOCK_MONOTONIC ms), or 0 */
	int64_t next_save;         /* no request before this (monotonic ms) */
	int saving;                /* requested; the save runs before the next tick */
	char *refusals_file;       /* NULL: refusals not counted */
	char *refusals_tmp;
	struct fg_refusal *refusals;
	unsigned n_refusals;
	uint64_t other_denied;     /* accounts beyond FG_MAX_ACCOUNTS */
	uint64_t total_denied;
	int64_t since_ms;
	int refusals_dirty;
	int64_t next_refusals_write;
	struct fg_pending pending;
	const struct mosquitto *will_of;  /* the client whose will is checked next */
	int in_subscribe;          /* retained messages' sources are checked now */
	char *log_path;            /* NULL: protocol errors not counted */
	int log_fd;
	enum fg_log_state log_state;
	char log_error[160];
	int reloaded;              /* the broker reopened its log in this loop pass */
	char line[FG_LINE_MAX + 1];
	size_t line_len;
	int line_long;             /* the line being read is longer than FG_LINE_MAX: skipped */
	struct fg_proto *protos;
	unsigned n_protos;
	uint64_t other_proto;      /* sources beyond FG_MAX_ACCOUNTS */
	uint64_t total_proto;
};

static struct fg_state fg;

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Ask the broker for a save (SIGUSR1: it writes the database at the end of this loop pass)
 * when a message is waiting for one and the last request is long enough ago. */
static void maybe_save(struct fg_state *st, int64_t now)
{
	if(!st->save_ms || !st->dirty || st->saving || now < st->next_save) return;
	st->dirty = 0;
	st->saving = 1;
	st->requested = now;
	raise(SIGUSR1);
}

/* Copy at most max bytes of src, as JSON-safe printable ASCII ('"', '\\' and others: '?'). */
static void safe_copy(char *dst, const char *src, size_t max)
{
	size_t i = 0;

	for(; src && src[i] && i < max; i++){
		unsigned char c = (unsigned char)src[i];
		dst[i] = (c < 0x20 || c > 0x7e || c == '"' || c == '\\') ? '?' : (char)c;
	}
	dst[i] = '\0';
}

static void record_denial(struct fg_state *st, const struct fg_pending *p)
{
	struct fg_refusal *r = NULL;

	for(unsigned i = 0; i < st->n_refusals; i++){
		if(!strcmp(st->refusals[i].account, p->account)){
			r = &st->refusals[i];
			break;
		}
	}
	if(!r && st->n_refusals < FG_MAX_ACCOUNTS){
		r = &st->refusals[st->n_refusals++];
		memcpy(r->account, p->account, sizeof(r->account));
	}
	st->total_denied++;
	st->refusals_dirty = 1;
	if(!r){
		st->other_denied++;
		return;
	}
	r->denied++;
	r->last_ms = now_ms();
	memcpy(r->client, p->client_id, sizeof(r->client));
	memcpy(r->topic, p->topic, sizeof(r->topic));
}

/* A pending write check that got no message event was denied. */
static void resolve_pending(struct fg_state *st)
{
	if(st->pending.active){
		st->pending.active = 0;
		record_denial(st, &st->pending);
	}
}

/* What Mosquitto 2.0.11's do_disconnect logs after "Client <id> disconnected due to " when a
 * client broke the protocol or the broker's limits (src/loop.c); its other reasons (closed
 * its connection, not authorised, keepalive, out of memory, administrative) are not counted. */
static const char *const fg_protocol_kinds[] = {
	"malformed packet",
	"protocol error",
	"oversize packet",
	"oversize payload",
	"QoS too high or retain not supported",
};

static void log_failed(struct fg_state *st, enum fg_log_state state, const char *what)
{
	if(st->log_fd >= 0) close(st->log_fd);
	st->log_fd = -1;
	st->log_state = state;
	snprintf(st->log_error, sizeof(st->log_error), "%s", what);
	st->refusals_dirty = 1;
	mosquitto_log_printf(MOSQ_LOG_WARNING, "fieldgate_stamp: %s: %s; protocol errors not counted",
			st->log_path, what);
}

static void record_protocol_error(struct fg_state *st, const char *id, const char *kind,
		const struct mosquitto *client)
{
	struct fg_proto *r = NULL;
	char account[FG_NAME_MAX + 1] = "", client_id[FG_NAME_MAX + 1], address[FG_ADDRESS_MAX + 1] = "";
	char source[FG_NAME_MAX + 1];
	const char *own = client ? mosquitto_client_id(client) : NULL;

	safe_copy(client_id, id, FG_NAME_MAX);
	/* the line of the client whose disconnect event this is (its id, or "<unknown>" before
	 * a login): named by its account and address */
	if(client && !strcmp(id, own ? own : "<unknown>")){
		safe_copy(account, mosquitto_client_username(client), FG_NAME_MAX);
		safe_copy(address, mosquitto_client_address(client), FG_ADDRESS_MAX);
	}
	if(account[0]) memcpy(source, account, sizeof(source));
	else if(address[0] && !own) memcpy(source, address, sizeof(source));
	else memcpy(source, client_id, sizeof(source));

	for(unsigned i = 0; i < st->n_protos; i++){
		if(!strcmp(st->protos[i].source, source)){
			r = &st->protos[i];
			break;
		}
	}
	if(!r && st->n_protos < FG_MAX_ACCOUNTS){
		r = &st->protos[st->n_protos++];
		memcpy(r->source, source, sizeof(r->source));
	}
	st->total_proto++;
	st->refusals_dirty = 1;
	if(!r){
		st->other_proto++;
		return;
	}
	r->errors++;
	r->last_ms = now_ms();
	memcpy(r->account, account, sizeof(r->account));
	memcpy(r->client, client_id, sizeof(r->client));
	memcpy(r->address, address, sizeof(r->address));
	safe_copy(r->kind, kind, FG_NAME_MAX);
}

/* One line of the broker's log: "[<timestamp>: ]Client <id> disconnected due to <kind>." with
 * a kind of fg_protocol_kinds. Only a line that starts so counts ("Client " at its start or
 * right after the timestamp's ": "), so a client id inside another line cannot fake one. */
static void log_line(struct fg_state *st, char *line, const struct mosquitto *client)
{
	static const char client_word[] = "Client ", due[] = " disconnected due to ";
	char *id, *kind, *p, *end;
	size_t len;

	if(st->log_state == FG_LOG_CHECKING){
		if(strstr(line, fg_build)){
			st->log_state = FG_LOG_READING;
			st->log_error[0] = '\0';
		}
		return;
	}
	id = strstr(line, client_word);
	if(!id || (id != line && (id - line < 2 || id[-2] != ':' || id[-1] != ' '))) return;
	id += sizeof(client_word) - 1;
	kind = NULL;
	for(p = strstr(id, due); p; p = strstr(p + 1, due)) kind = p;  /* the last one */
	if(!kind) return;
	len = strlen(kind);
	end = kind + len - 1;
	if(*end != '.') return;
	*kind = '\0';
	*end = '\0';
	kind += sizeof(due) - 1;
	for(size_t i = 0; i < sizeof(fg_protocol_kinds) / sizeof(fg_protocol_kinds[0]); i++){
		if(!strcmp(kind, fg_protocol_kinds[i])){
			record_protocol_error(st, id, kind, client);
			return;
		}
	}
}

/* Read what the broker logged since the last call, line by line. */
static void read_log(struct fg_state *st, const struct mosquitto *client)
{
	char buf[8192];
	ssize_t n;

	if(st->log_fd < 0) return;
	while((n = read(st->log_fd, buf, sizeof(buf))) > 0){
		for(ssize_t i = 0; i < n; i++){
			if(buf[i] == '\n'){
				if(!st->line_long){
					st->line[st->line_len] = '\0';
					log_line(st, st->line, client);
				}
				st->line_len = 0;
				st->line_long = 0;
			}else if(st->line_len < FG_LINE_MAX){
				st->line[st->line_len++] = buf[i];
			}else{
				st->line_long = 1;
			}
		}
	}
	if(n < 0 && errno != EINTR && errno != EAGAIN) log_failed(st, FG_LOG_UNREADABLE, strerror(errno));
}

static int open_log(struct fg_state *st, int at_end)
{
	int fd = open(st->log_path, O_RDONLY | O_CLOEXEC);

	if(fd < 0){
		char what[160];
		snprintf(what, sizeof(what), "cannot read it: %s", strerror(errno));
		log_failed(st, FG_LOG_UNREADABLE, what);
		return -1;
	}
	if(at_end && lseek(fd, 0, SEEK_END) < 0){
		int err = errno;
		close(fd);
		log_failed(st, FG_LOG_UNREADABLE, strerror(err));
		return -1;
	}
	if(st->log_fd >= 0) close(st->log_fd);
	st->log_fd = fd;
	st->line_len = 0;
	st->line_long = 0;
	return 0;
}

/* On the tick after a reload the broker writes to PATH opened anew (logrotate renamed the
 * old file): finish the old one, then follow. A file cut short is read from its start. */
static void follow_log(struct fg_state *st)
{
	struct stat now, cur;

	if(st->log_fd < 0) return;
	if(st->reloaded){
		st->reloaded = 0;
		read_log(st, NULL);
		if(st->log_fd >= 0 && !stat(st->log_path, &now) && !fstat(st->log_fd, &cur)
				&& (now.st_dev != cur.st_dev || now.st_ino != cur.st_ino)){
			if(open_log(st, 0)) return;
		}
	}
	if(!fstat(st->log_fd, &cur) && cur.st_size < lseek(st->log_fd, 0, SEEK_CUR)){
		lseek(st->log_fd, 0, SEEK_SET);
		st->line_len = 0;
		st->line_long = 0;
	}
	read_log(st, NULL);
	if(st->log_state == FG_LOG_CHECKING){
		log_failed(st, FG_LOG_FOREIGN, "the plugin's start notice did not appear in it: not the "
				"broker's log_dest file, or log_type notice is off");
	}
}

static void write_refusals(struct fg_state *st)
{
	FILE *f;
	int ok;

	f = fopen(st->refusals_tmp, "w");
	if(!f){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "fieldgate_stamp: cannot write %s: %s",
				st->refusals_tmp, strerror(errno));
		return;
	}
	fchmod(fileno(f), 0644);
	fprintf(f, "{\"since_ms\": %" PRId64 ", \"written_ms\": %" PRId64 ", \"denied\": %" PRIu64
			", \"other_accounts_denied\": %" PRIu64 ", \"accounts\": [",
			st->since_ms, now_ms(), st->total_denied, st->other_denied);
	for(unsigned i = 0; i < st->n_refusals; i++){
		const struct fg_refusal *r = &st->refusals[i];
		fprintf(f, "%s\n {\"account\": \"%s\", \"client\": \"%s\", \"denied\": %" PRIu64
				", \"last_topic\": \"%s\", \"last_ms\": %" PRId64 "}",
				i ? "," : "", r->account, r->client, r->denied, r->topic, r->last_ms);
	}
	fputs("]", f);
	if(st->log_path){
		static const char *const states[] = {"off", "checking", "reading", "foreign", "unreadable"};
		fprintf(f, ",\n \"broker_log\": \"%s\", \"broker_log_state\": \"%s\", \"broker_log_error\": \"%s\""
				", \"protocol_errors\": %" PRIu64 ", \"other_sources_protocol_errors\": %" PRIu64
				", \"protocol_error_sources\": [",
				st->log_path, states[st->log_state], st->log_error, st->total_proto, st->other_proto);
		for(unsigned i = 0; i < st->n_protos; i++){
			const struct fg_proto *r = &st->protos[i];
			fprintf(f, "%s\n {\"source\": \"%s\", \"account\": \"%s\", \"client\": \"%s\", "
					"\"address\": \"%s\", \"errors\": %" PRIu64 ", \"last_error\": \"%s\", "
					"\"last_ms\": %" PRId64 "}",
					i ? "," : "", r->source, r->account, r->client, r->address, r->errors,
					r->kind, r->last_ms);
		}
		fputs("]", f);
	}
	fputs("}\n", f);
	ok = !ferror(f);
	ok = (fclose(f) == 0) && ok;
	if(!ok || rename(st->refusals_tmp, st->refusals_file)){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "fieldgate_stamp: cannot write %s: %s",
				st->refusals_file, strerror(errno));
		remove(st->refusals_tmp);
	}
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	struct fg_state *st = userdata;

	(void)event;
	resolve_pending(st);
	if(ed->access == MOSQ_ACL_SUBSCRIBE){
		st->in_subscribe = 1;
	}else if(ed->access == MOSQ_ACL_WRITE){
		if(ed->client == st->will_of){
			st->will_of = NULL;  /* its will, after its disconnect */
		}else if(!st->in_subscribe){
			st->pending.active = 1;
			st->pending.client = ed->client;
			safe_copy(st->pending.account, mosquitto_client_username(ed->client), FG_NAME_MAX);
			safe_copy(st->pending.client_id, mosquitto_client_id(ed->client), FG_NAME_MAX);
			safe_copy(st->pending.topic, ed->topic, FG_TOPIC_MAX);
		}
	}
	return MOSQ_ERR_PLUGIN_DEFER;
}

static int on_disconnect(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_disconnect *ed = event_data;
	struct fg_state *st = userdata;

	(void)event;
	resolve_pending(st);
	st->in_subscribe = 0;
	st->will_of = ed->client;
	/* the broker logged why just before (src/loop.c, do_disconnect) */
	if(st->log_state == FG_LOG_READING) read_log(st, ed->client);
	return MOSQ_ERR_SUCCESS;
}

static int on_reload(int event, void *event_data, void *userdata)
{
	struct fg_state *st = userdata;

	(void)event;
	(void)event_data;
	st->reloaded = 1;  /* the broker reopens its log after this event, in this loop pass */
	return MOSQ_ERR_SUCCESS;
}

static int on_tick(int event, void *event_data, void *userdata)
{
	struct fg_state *st = userdata;
	int64_t now = mono_ms();

	(void)event;
	(void)event_data;
	if(st->saving){
		/* the pass that ended just now wrote the database: the next save waits save_ms, or
		 * twice as long as this one took */
		int64_t took = now - st->requested;
		int64_t wait = 2 * took > st->save_ms ? 2 * took : st->save_ms;
		st->saving = 0;
		st->next_save = st->requested + wait;
	}
	maybe_save(st, now);
	if(st->refusals_file){
		resolve_pending(st);
		st->in_subscribe = 0;
		st->will_of = NULL;
		if(st->log_path) follow_log(st);
		if(st->refusals_dirty && now >= st->next_refusals_write){
			st->refusals_dirty = 0;
			st->next_refusals_write = now + FG_REFUSALS_EVERY_MS;
			write_refusals(st);
		}
	}
	return MOSQ_ERR_SUCCESS;
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
	if(st->refusals_file){
		if(st->pending.active && st->pending.client == ed->client) st->pending.active = 0;
		resolve_pending(st);
		st->in_subscribe = 0;
		st->will_of = NULL;
	}
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
		return rc;
	}
	st->dirty = 1;
	maybe_save(st, mono_ms());
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

static int parse_save_ms(const char *text, int64_t *ms)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(text, &end, 10);
	if(errno || end == text || *end || v < 0 || v > FG_MAX_SAVE_MS) return MOSQ_ERR_INVAL;
	*ms = v;
	return MOSQ_ERR_SUCCESS;
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

static void unregister_all(struct fg_state *st)
{
	mosquitto_callback_unregister(st->pid, MOSQ_EVT_MESSAGE, on_message, NULL);
	if(st->save_ms || st->refusals_file) mosquitto_callback_unregister(st->pid, MOSQ_EVT_TICK, on_tick, NULL);
	if(st->refusals_file){
		mosquitto_callback_unregister(st->pid, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
		mosquitto_callback_unregister(st->pid, MOSQ_EVT_DISCONNECT, on_disconnect, NULL);
	}
	if(st->log_path) mosquitto_callback_unregister(st->pid, MOSQ_EVT_RELOAD, on_reload, NULL);
}

static void cleanup_state(struct fg_state *st)
{
	mosquitto_free(st->last);
	mosquitto_free(st->refusals_file);
	mosquitto_free(st->refusals_tmp);
	mosquitto_free(st->refusals);
	mosquitto_free(st->log_path);
	mosquitto_free(st->protos);
	if(st->log_fd >= 0) close(st->log_fd);
	st->log_fd = -1;
	st->log_path = NULL;
	st->protos = NULL;
	st->last = NULL;
	st->refusals_file = NULL;
	st->refusals_tmp = NULL;
	st->refusals = NULL;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **user_data,
		struct mosquitto_opt *opts, int opt_count)
{
	uint32_t slots = FG_DEFAULT_SLOTS;
	int64_t save_ms = FG_DEFAULT_SAVE_MS;
	const char *refusals_file = NULL;
	const char *broker_log = NULL;
	int rc;

	for(int i = 0; i < opt_count; i++){
		if(!strcmp(opts[i].key, "slots")){
			if(parse_slots(opts[i].value, &slots)){
				mosquitto_log_printf(MOSQ_LOG_ERR,
						"fieldgate_stamp: plugin_opt_slots must be a power of two from 1 to %u, not '%s'",
						FG_MAX_SLOTS, opts[i].value);
				return MOSQ_ERR_INVAL;
			}
		}else if(!strcmp(opts[i].key, "refusals_file")){
			if(opts[i].value[0] != '/'){
				mosquitto_log_printf(MOSQ_LOG_ERR,
						"fieldgate_stamp: plugin_opt_refusals_file must be an absolute path, not '%s'", opts[i].value);
				return MOSQ_ERR_INVAL;
			}
			refusals_file = opts[i].value;
		}else if(!strcmp(opts[i].key, "broker_log")){
			/* (written into the JSON as it is: no quote, backslash or control character) */
			int plain = opts[i].value[0] == '/' && !strpbrk(opts[i].value, "\"\\");
			for(const char *c = opts[i].value; plain && *c; c++) plain = (unsigned char)*c >= 0x20;
			if(!plain){
				mosquitto_log_printf(MOSQ_LOG_ERR,
						"fieldgate_stamp: plugin_opt_broker_log must be an absolute path without quotes, backslashes or control characters, not '%s'", opts[i].value);
				return MOSQ_ERR_INVAL;
			}
			broker_log = opts[i].value;
		}else if(!strcmp(opts[i].key, "save_ms")){
			if(parse_save_ms(opts[i].value, &save_ms)){
				mosquitto_log_printf(MOSQ_LOG_ERR,
						"fieldgate_stamp: plugin_opt_save_ms must be milliseconds from 0 to %d, not '%s'",
						FG_MAX_SAVE_MS, opts[i].value);
				return MOSQ_ERR_INVAL;
			}
		}else{
			mosquitto_log_printf(MOSQ_LOG_ERR,
					"fieldgate_stamp: unknown option plugin_opt_%s (known: plugin_opt_slots, plugin_opt_save_ms, plugin_opt_refusals_file, plugin_opt_broker_log)", opts[i].key);
			return MOSQ_ERR_INVAL;
		}
	}

	if(broker_log && !refusals_file){
		mosquitto_log_printf(MOSQ_LOG_ERR,
				"fieldgate_stamp: plugin_opt_broker_log needs plugin_opt_refusals_file (the counts are written there)");
		return MOSQ_ERR_INVAL;
	}

	memset(&fg, 0, sizeof(fg));
	fg.log_fd = -1;
	fg.last = mosquitto_calloc(slots, sizeof(uint64_t));
	if(!fg.last) return MOSQ_ERR_NOMEM;
	fg.mask = slots - 1;
	fg.pid = identifier;
	fg.save_ms = save_ms;
	fg.since_ms = now_ms();
	if(refusals_file){
		size_t len = strlen(refusals_file);
		fg.refusals_file = mosquitto_strdup(refusals_file);
		fg.refusals_tmp = mosquitto_malloc(len + 5);
		fg.refusals = mosquitto_calloc(FG_MAX_ACCOUNTS, sizeof(struct fg_refusal));
		if(!fg.refusals_file || !fg.refusals_tmp || !fg.refusals){
			cleanup_state(&fg);
			return MOSQ_ERR_NOMEM;
		}
		memcpy(fg.refusals_tmp, refusals_file, len);
		memcpy(fg.refusals_tmp + len, ".tmp", 5);
	}
	if(broker_log){
		fg.log_path = mosquitto_strdup(broker_log);
		fg.protos = mosquitto_calloc(FG_MAX_ACCOUNTS, sizeof(struct fg_proto));
		if(!fg.log_path || !fg.protos){
			cleanup_state(&fg);
			return MOSQ_ERR_NOMEM;
		}
		/* from where the log stands now: the start notice below is the first line read */
		fg.log_state = FG_LOG_CHECKING;
		snprintf(fg.log_error, sizeof(fg.log_error), "not read yet: the broker stopped before its first loop pass");
		open_log(&fg, 1);
		fg.refusals_dirty = 1;  /* the file says from the start whether the log is read */
	}
	rc = mosquitto_callback_register(identifier, MOSQ_EVT_MESSAGE, on_message, NULL, &fg);
	if(!rc && (save_ms || refusals_file)){
		rc = mosquitto_callback_register(identifier, MOSQ_EVT_TICK, on_tick, NULL, &fg);
	}
	if(!rc && refusals_file){
		rc = mosquitto_callback_register(identifier, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, &fg);
		if(!rc) rc = mosquitto_callback_register(identifier, MOSQ_EVT_DISCONNECT, on_disconnect, NULL, &fg);
	}
	if(!rc && broker_log){
		rc = mosquitto_callback_register(identifier, MOSQ_EVT_RELOAD, on_reload, NULL, &fg);
	}
	if(rc){
		unregister_all(&fg);
		cleanup_state(&fg);
		return rc;
	}
	*user_data = &fg;
	mosquitto_log_printf(MOSQ_LOG_NOTICE,
			"%s: stamping every incoming message with " FG_PROPERTY " (%u slots, %zu bytes); "
			"saving the persistence database within %" PRId64 " ms of a message (0: never); "
			"refusals counted in %s; protocol errors read from %s",
			fg_build, slots, (size_t)slots * sizeof(uint64_t), save_ms,
			refusals_file ? refusals_file : "(nowhere)", broker_log ? broker_log : "(nowhere)");
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_cleanup(void *user_data, struct mosquitto_opt *opts, int opt_count)
{
	struct fg_state *st = user_data;

	(void)opts;
	(void)opt_count;
	if(!st) return MOSQ_ERR_SUCCESS;
	if(st->refusals_file && st->refusals_dirty) write_refusals(st);
	unregister_all(st);
	cleanup_state(st);
	return MOSQ_ERR_SUCCESS;
}
