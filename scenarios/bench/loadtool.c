/*
 * loadtool: the small load clients and the TCP backend of shoal's side-by-side benchmark
 * (scenarios/bench/run.py builds it with gcc and drives it; see README.md beside this file).
 *
 * Everything is single-threaded, epoll-driven and bounded in time. Client modes print one JSON
 * object on stdout; latencies are measured with CLOCK_MONOTONIC and reported in microseconds.
 *
 *   loadtool serve SINK_ADDR ECHO_ADDR WS_ADDR MAX_SECONDS
 *       Backends: SINK_ADDR reads and discards, ECHO_ADDR echoes every byte back, WS_ADDR
 *       accepts WebSockets and echoes every message (plain HTTP requests get `ok`).
 *   loadtool bulk ADDR SECONDS CONNS
 *       Pushes 64 KiB writes on CONNS connections; reports the steady-state send rate.
 *   loadtool connrate ADDR SECONDS CONC
 *       CONC parallel loops of: connect, send 16 bytes, read the 16-byte echo, close.
 *   loadtool ws ADDR PATH SECONDS CONNS MSG_BYTES
 *       Opens CONNS WebSockets and does echo round trips of MSG_BYTES (<= 125) binary messages,
 *       one in flight per connection.
 *   loadtool idle ADDR PATH N MAX_HOLD_SECONDS
 *       Opens N keep-alive HTTP connections (one GET each, response read), prints a JSON line,
 *       keeps them open until a line (or EOF) arrives on stdin or MAX_HOLD_SECONDS pass, then
 *       prints a second JSON line saying how many were still open and closes them.
 *   loadtool wsidle ADDR PATH N MAX_HOLD_SECONDS SAMPLE
 *       Opens N WebSockets (upgrade, then one 16-byte message echoed on each), prints a JSON
 *       line, holds them idle like `idle`, then counts those still open, sends the message again
 *       on SAMPLE of them spread over all N, and prints a second JSON line with the echoes that
 *       came back within 10 s.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 512
#define MAX_SAMPLES (32u * 1024u * 1024u)

/* ---------- helpers ---------- */

static void die(const char *what) {
    fprintf(stderr, "loadtool: %s: %s\n", what, strerror(errno));
    exit(2);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static struct sockaddr_in parse_addr(const char *s) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    char host[64];
    const char *colon = strrchr(s, ':');
    if (!colon || (size_t)(colon - s) >= sizeof host) {
        fprintf(stderr, "loadtool: bad address %s (want IP:PORT)\n", s);
        exit(2);
    }
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = 0;
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
        fprintf(stderr, "loadtool: bad IP %s\n", host);
        exit(2);
    }
    a.sin_port = htons((uint16_t)atoi(colon + 1));
    return a;
}

static void set_nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL, 0);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) die("fcntl");
}

static void set_nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* A non-blocking connect. Returns the fd or -1. */
static int start_connect(const struct sockaddr_in *to) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    set_nodelay(fd);
    if (connect(fd, (const struct sockaddr *)to, sizeof *to) < 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    return fd;
}

/* A blocking connect with send/receive timeouts, for setup phases. */
static int connect_blocking(const struct sockaddr_in *to, int timeout_s) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    struct timeval tv = {.tv_sec = timeout_s, .tv_usec = 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    set_nodelay(fd);
    if (connect(fd, (const struct sockaddr *)to, sizeof *to) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static int write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Latency samples in nanoseconds (clamped to 32 bits, about 4.29 s). */
typedef struct {
    uint32_t *v;
    size_t n, cap;
} samples_t;

static void sample_add(samples_t *s, uint64_t ns) {
    if (s->n == s->cap) {
        if (s->cap >= MAX_SAMPLES) return;
        s->cap = s->cap ? s->cap * 2 : 65536;
        s->v = realloc(s->v, s->cap * sizeof *s->v);
        if (!s->v) die("realloc");
    }
    s->v[s->n++] = ns > UINT32_MAX ? UINT32_MAX : (uint32_t)ns;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* Sorts the samples and returns the given percentile in microseconds (0 when empty). */
static double percentile_us(samples_t *s, double p) {
    if (s->n == 0) return 0;
    size_t idx = (size_t)((double)(s->n - 1) * p / 100.0 + 0.5);
    return s->v[idx] / 1000.0;
}

static void sort_samples(samples_t *s) {
    if (s->n) qsort(s->v, s->n, sizeof *s->v, cmp_u32);
}

static volatile sig_atomic_t stop_requested = 0;
static void on_stop(int sig) {
    (void)sig;
    stop_requested = 1;
}

/* ---------- serve: sink, echo and WebSocket echo backends ---------- */

/* SHA-1 (FIPS 180-4), only for the WebSocket handshake's Sec-WebSocket-Accept. */
static uint32_t rol32(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static void sha1_block(uint32_t h[5], const uint8_t *p) {
    uint32_t w[80];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 |
               (uint32_t)p[4 * i + 3];
    for (int i = 16; i < 80; i++) w[i] = rol32(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 80; i++) {
        uint32_t f, k;
        if (i < 20) f = (b & c) | (~b & d), k = 0x5A827999;
        else if (i < 40) f = b ^ c ^ d, k = 0x6ED9EBA1;
        else if (i < 60) f = (b & c) | (b & d) | (c & d), k = 0x8F1BBCDC;
        else f = b ^ c ^ d, k = 0xCA62C1D6;
        uint32_t t = rol32(a, 5) + f + e + k + w[i];
        e = d, d = c, c = rol32(b, 30), b = a, a = t;
    }
    h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e;
}

static void sha1(const uint8_t *data, size_t len, uint8_t out[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    size_t off = 0;
    for (; off + 64 <= len; off += 64) sha1_block(h, data + off);
    uint8_t tail[128] = {0};
    size_t rest = len - off;
    memcpy(tail, data + off, rest);
    tail[rest] = 0x80;
    size_t tail_len = rest + 9 <= 64 ? 64 : 128;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++) tail[tail_len - 1 - i] = (uint8_t)(bits >> (8 * i));
    for (size_t o = 0; o < tail_len; o += 64) sha1_block(h, tail + o);
    for (int i = 0; i < 20; i++) out[i] = (uint8_t)(h[i / 4] >> (24 - 8 * (i % 4)));
}

static void base64(const uint8_t *in, size_t len, char *out) {
    static const char tbl[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < len; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < len ? (uint32_t)in[i + 1] << 8 : 0) |
                     (i + 2 < len ? in[i + 2] : 0);
        out[o++] = tbl[v >> 18 & 63];
        out[o++] = tbl[v >> 12 & 63];
        out[o++] = i + 1 < len ? tbl[v >> 6 & 63] : '=';
        out[o++] = i + 2 < len ? tbl[v & 63] : '=';
    }
    out[o] = 0;
}

enum { K_LISTEN_SINK = 1, K_LISTEN_ECHO, K_LISTEN_WS, K_SINK, K_ECHO, K_WS };
#define WS_MAX_INPUT (1 << 20)

typedef struct {
    int kind, fd;
    int upgraded; /* ws: handshake done, input is frames */
    int closing;  /* close once `out` is flushed */
    char *in;     /* ws: input not parsed yet */
    size_t ilen, icap;
    char *out; /* bytes not written yet */
    size_t olen, ooff, ocap;
} sconn_t;

static void append(char **buf, size_t *len, size_t *cap, const void *data, size_t n) {
    if (*len + n > *cap) {
        *cap = (*len + n) * 2;
        *buf = realloc(*buf, *cap);
        if (!*buf) die("realloc");
    }
    memcpy(*buf + *len, data, n);
    *len += n;
}

static void out_append(sconn_t *c, const void *data, size_t n) { append(&c->out, &c->olen, &c->ocap, data, n); }

/* Finds a header's value in an HTTP head (case-insensitive name); copies it to `val`. */
static int header_value(const char *head, size_t head_len, const char *name, char *val, size_t cap) {
    size_t nl = strlen(name);
    for (const char *p = head; p + nl + 2 < head + head_len; p++) {
        if (p[0] != '\n' || strncasecmp(p + 1, name, nl) != 0 || p[1 + nl] != ':') continue;
        const char *v = p + 2 + nl;
        while (*v == ' ' || *v == '\t') v++;
        size_t n = 0;
        while (v + n < head + head_len && v[n] != '\r' && v[n] != '\n' && n + 1 < cap) n++;
        memcpy(val, v, n);
        val[n] = 0;
        return 1;
    }
    return 0;
}

/* WebSocket backend: plain requests get `ok` (health checks) and are closed; an Upgrade is
 * accepted and then every data frame is echoed unmasked, pings answered, a close echoed. */
static void ws_process(sconn_t *c) {
    while (!c->upgraded && !c->closing) {
        char *end = memmem(c->in, c->ilen, "\r\n\r\n", 4);
        if (!end) {
            if (c->ilen > 16384) c->closing = 1;
            return;
        }
        size_t head_len = (size_t)(end - c->in) + 4;
        char key[128], resp[256];
        if (header_value(c->in, head_len, "Sec-WebSocket-Key", key, sizeof key - 40)) {
            static const char guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
            uint8_t digest[20];
            char accept[32];
            strcat(key, guid);
            sha1((const uint8_t *)key, strlen(key), digest);
            base64(digest, 20, accept);
            int n = snprintf(resp, sizeof resp,
                             "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
                             accept);
            out_append(c, resp, (size_t)n);
            c->upgraded = 1;
        } else {
            static const char ok[] =
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n";
            out_append(c, ok, sizeof ok - 1);
            c->closing = 1;
        }
        memmove(c->in, c->in + head_len, c->ilen - head_len);
        c->ilen -= head_len;
    }
    while (c->upgraded && !c->closing && c->ilen >= 2) {
        const uint8_t *p = (const uint8_t *)c->in;
        int opcode = p[0] & 0x0f, masked = p[1] & 0x80;
        uint64_t len = p[1] & 0x7f;
        size_t hdr = 2;
        if (len == 126) {
            if (c->ilen < 4) return;
            len = (uint64_t)p[2] << 8 | p[3];
            hdr = 4;
        } else if (len == 127) {
            if (c->ilen < 10) return;
            len = 0;
            for (int i = 0; i < 8; i++) len = len << 8 | p[2 + i];
            hdr = 10;
        }
        if (len > WS_MAX_INPUT) {
            c->closing = 1;
            return;
        }
        size_t mask_at = hdr;
        if (masked) hdr += 4;
        if (c->ilen < hdr + len) return;
        uint8_t *payload = (uint8_t *)c->in + hdr;
        if (masked)
            for (uint64_t i = 0; i < len; i++) payload[i] ^= p[mask_at + (i & 3)];
        if (opcode != 0xA) { /* pongs need no answer */
            uint8_t out_hdr[10];
            size_t oh = 2;
            out_hdr[0] = (uint8_t)((p[0] & 0xf0) | (opcode == 0x9 ? 0xA : opcode));
            if (len < 126) {
                out_hdr[1] = (uint8_t)len;
            } else if (len < 65536) {
                out_hdr[1] = 126, out_hdr[2] = (uint8_t)(len >> 8), out_hdr[3] = (uint8_t)len, oh = 4;
            } else {
                out_hdr[1] = 127, oh = 10;
                for (int i = 0; i < 8; i++) out_hdr[2 + i] = (uint8_t)(len >> (56 - 8 * i));
            }
            out_append(c, out_hdr, oh);
            out_append(c, payload, (size_t)len);
        }
        if (opcode == 0x8) c->closing = 1;
        size_t used = hdr + (size_t)len;
        memmove(c->in, c->in + used, c->ilen - used);
        c->ilen -= used;
    }
}

static int listen_on(const char *addr) {
    struct sockaddr_in a = parse_addr(addr);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die(addr);
    if (listen(fd, 4096) < 0) die("listen");
    return fd;
}

static void sconn_close(int ep, sconn_t *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->in);
    free(c->out);
    free(c);
}

/* Writes what is pending: -1 on error, 0 when all is written, 1 when the socket is full. */
static int flush_out(sconn_t *c) {
    while (c->ooff < c->olen) {
        ssize_t w = write(c->fd, c->out + c->ooff, c->olen - c->ooff);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) return 1;
        if (w <= 0) return -1;
        c->ooff += (size_t)w;
    }
    c->olen = c->ooff = 0;
    return 0;
}

static void watch(int ep, sconn_t *c, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Handles readiness of one connection; returns 0 when it was closed. */
static int serve_conn(int ep, sconn_t *c, char *buf, size_t cap) {
    if (c->olen > c->ooff) { /* writable again: flush first, read only once drained */
        int f = flush_out(c);
        if (f < 0 || (f == 0 && c->closing)) return sconn_close(ep, c), 0;
        if (f > 0) return 1;
        watch(ep, c, EPOLLIN);
    }
    for (int rounds = 0; rounds < 16; rounds++) {
        ssize_t r = read(c->fd, buf, cap);
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) break;
        if (r <= 0) return sconn_close(ep, c), 0;
        if (c->kind == K_SINK) continue;
        if (c->kind == K_ECHO) {
            out_append(c, buf, (size_t)r);
        } else {
            if (c->ilen + (size_t)r > WS_MAX_INPUT + 16) return sconn_close(ep, c), 0;
            append(&c->in, &c->ilen, &c->icap, buf, (size_t)r);
            ws_process(c);
        }
        int f = flush_out(c);
        if (f < 0 || (f == 0 && c->closing)) return sconn_close(ep, c), 0;
        if (f > 0) { /* the peer is slow: stop reading until it catches up */
            watch(ep, c, EPOLLOUT);
            return 1;
        }
    }
    return 1;
}

static int cmd_serve(int argc, char **argv) {
    if (argc != 4) return -1;
    int max_s = atoi(argv[3]);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, on_stop);
    signal(SIGINT, on_stop);
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    static const int listen_kinds[3] = {K_LISTEN_SINK, K_LISTEN_ECHO, K_LISTEN_WS};
    for (int i = 0; i < 3; i++) {
        sconn_t *l = calloc(1, sizeof *l);
        l->kind = listen_kinds[i];
        l->fd = listen_on(argv[i]);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = l};
        epoll_ctl(ep, EPOLL_CTL_ADD, l->fd, &ev);
    }
    printf("{\"serving\": true}\n");
    fflush(stdout);
    static char buf[256 * 1024];
    uint64_t deadline = now_ns() + (uint64_t)max_s * 1000000000ull;
    struct epoll_event evs[MAX_EVENTS];
    while (!stop_requested && now_ns() < deadline) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, 200);
        for (int i = 0; i < n; i++) {
            sconn_t *c = evs[i].data.ptr;
            if (c->kind >= K_SINK) {
                serve_conn(ep, c, buf, sizeof buf);
                continue;
            }
            for (int k = 0; k < 64; k++) {
                int fd = accept4(c->fd, NULL, NULL, SOCK_NONBLOCK);
                if (fd < 0) break;
                set_nodelay(fd);
                sconn_t *nc = calloc(1, sizeof *nc);
                nc->kind = c->kind + (K_SINK - K_LISTEN_SINK);
                nc->fd = fd;
                struct epoll_event ev = {.events = EPOLLIN, .data.ptr = nc};
                epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
            }
        }
    }
    return 0;
}

/* ---------- bulk: push data to a sink ---------- */

static int cmd_bulk(int argc, char **argv) {
    if (argc != 3) return -1;
    struct sockaddr_in to = parse_addr(argv[0]);
    double seconds = atof(argv[1]);
    int conns = atoi(argv[2]);
    signal(SIGPIPE, SIG_IGN);
    int ep = epoll_create1(0);
    int *fds = calloc((size_t)conns, sizeof *fds);
    for (int i = 0; i < conns; i++) {
        fds[i] = connect_blocking(&to, 5);
        if (fds[i] < 0) die("connect");
        set_nonblock(fds[i]);
        struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
    }
    static char buf[64 * 1024];
    memset(buf, 'x', sizeof buf);
    /* The first 20 % of the time (at most 0.5 s) fills the socket buffers along the path and is
     * not counted, so the reported rate is what the path delivers, not what it can buffer. */
    double warm = seconds * 0.2 < 0.5 ? seconds * 0.2 : 0.5;
    uint64_t start = now_ns();
    uint64_t count_from = start + (uint64_t)(warm * 1e9);
    uint64_t end = start + (uint64_t)(seconds * 1e9);
    uint64_t counted = 0;
    long errors = 0;
    struct epoll_event evs[MAX_EVENTS];
    uint64_t t;
    while ((t = now_ns()) < end) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, 100);
        for (int i = 0; i < n; i++) {
            int fd = fds[evs[i].data.u32];
            if (fd < 0) continue;
            for (int k = 0; k < 8; k++) {
                ssize_t w = write(fd, buf, sizeof buf);
                if (w < 0) {
                    if (errno != EAGAIN && errno != EINTR) {
                        errors++;
                        epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                        close(fd);
                        fds[evs[i].data.u32] = -1;
                    }
                    break;
                }
                if (t >= count_from) counted += (uint64_t)w;
            }
        }
    }
    double counted_s = (double)(now_ns() - count_from) / 1e9;
    for (int i = 0; i < conns; i++)
        if (fds[i] >= 0) close(fds[i]);
    printf("{\"bytes\": %llu, \"seconds\": %.4f, \"gbytes_per_s\": %.4f, \"errors\": %ld}\n",
           (unsigned long long)counted, counted_s, counted / counted_s / 1e9, errors);
    return 0;
}

/* ---------- connrate: connect, 16-byte echo, close ---------- */

enum { S_IDLE, S_CONNECTING, S_READING };

typedef struct {
    int fd, state, got;
    uint64_t started;
} rconn_t;

static int cmd_connrate(int argc, char **argv) {
    if (argc != 3) return -1;
    struct sockaddr_in to = parse_addr(argv[0]);
    double seconds = atof(argv[1]);
    int conc = atoi(argv[2]);
    signal(SIGPIPE, SIG_IGN);
    int ep = epoll_create1(0);
    rconn_t *cs = calloc((size_t)conc, sizeof *cs);
    samples_t lat = {0};
    long done = 0, errors = 0;
    static const char msg[16] = "0123456789abcdef";
    char buf[64];
    uint64_t start = now_ns(), end = start + (uint64_t)(seconds * 1e9);

    /* (Re)starts slot i with a new connection. */
#define RESTART(i)                                                                        \
    do {                                                                                  \
        cs[i].fd = start_connect(&to);                                                    \
        cs[i].started = now_ns();                                                         \
        cs[i].got = 0;                                                                    \
        if (cs[i].fd < 0) {                                                               \
            errors++;                                                                     \
            cs[i].state = S_IDLE;                                                         \
        } else {                                                                          \
            cs[i].state = S_CONNECTING;                                                   \
            struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)(i)};      \
            epoll_ctl(ep, EPOLL_CTL_ADD, cs[i].fd, &ev);                                  \
        }                                                                                 \
    } while (0)

    for (int i = 0; i < conc; i++) RESTART(i);
    struct epoll_event evs[MAX_EVENTS];
    uint64_t t;
    while ((t = now_ns()) < end) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, 50);
        for (int k = 0; k < n; k++) {
            int i = (int)evs[k].data.u32;
            rconn_t *c = &cs[i];
            int failed = 0;
            if (c->state == S_CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err || write(c->fd, msg, sizeof msg) != (ssize_t)sizeof msg) {
                    failed = 1;
                } else {
                    c->state = S_READING;
                    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                }
            } else if (c->state == S_READING) {
                ssize_t r = read(c->fd, buf, sizeof buf);
                if (r < 0 && errno == EAGAIN) continue;
                if (r <= 0) {
                    failed = 1;
                } else {
                    c->got += (int)r;
                    if (c->got >= (int)sizeof msg) {
                        sample_add(&lat, now_ns() - c->started);
                        done++;
                        close(c->fd); /* closing removes it from the epoll set */
                        RESTART(i);
                    }
                }
            }
            if (failed) {
                errors++;
                close(c->fd);
                RESTART(i);
            }
        }
        /* slots whose socket could not even be created are retried here */
        for (int i = 0; i < conc; i++)
            if (cs[i].state == S_IDLE && now_ns() - cs[i].started > 10000000ull) RESTART(i);
    }
    double secs = (double)(now_ns() - start) / 1e9;
    for (int i = 0; i < conc; i++)
        if (cs[i].state != S_IDLE) close(cs[i].fd);
    sort_samples(&lat);
    printf("{\"connections\": %ld, \"errors\": %ld, \"seconds\": %.4f, \"per_s\": %.1f, "
           "\"p50_us\": %.1f, \"p99_us\": %.1f}\n",
           done, errors, secs, done / secs, percentile_us(&lat, 50), percentile_us(&lat, 99));
    return 0;
#undef RESTART
}

/* ---------- ws: WebSocket echo round trips ---------- */

static int read_http_head(int fd, char *buf, size_t cap) {
    size_t len = 0;
    while (len + 1 < cap) {
        ssize_t r = read(fd, buf + len, cap - 1 - len);
        if (r <= 0) return -1;
        len += (size_t)r;
        buf[len] = 0;
        if (strstr(buf, "\r\n\r\n")) return (int)len;
    }
    return -1;
}

/* A client frame of `size` (1..125) bytes: FIN + binary, masked with the all-zero key (so the
 * payload is as is). Returns its length; the echo the server sends back is 2 + size bytes. */
static int ws_client_frame(char *frame, int size) {
    frame[0] = (char)0x82;
    frame[1] = (char)(0x80 | size);
    memset(frame + 2, 0, 4);
    memset(frame + 6, 'm', (size_t)size);
    return 6 + size;
}

static int ws_upgrade_request(char *req, size_t cap, const char *path, const char *host) {
    return snprintf(req, cap,
                    "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Key: c2hvYWwtYmVuY2gta2V5IQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                    path, host);
}

/* 1 when buf holds the unmasked binary echo of a `size`-byte message, -1 when it cannot be one. */
static int ws_echo_complete(const char *buf, int len, int size) {
    if (len >= 1 && (unsigned char)buf[0] != 0x82) return -1;
    if (len >= 2 && (unsigned char)buf[1] != size) return -1;
    if (len > 2 + size) return -1;
    return len == 2 + size;
}

typedef struct {
    int fd, got;
    uint64_t sent_at;
} wconn_t;

static int cmd_ws(int argc, char **argv) {
    if (argc != 5) return -1;
    struct sockaddr_in to = parse_addr(argv[0]);
    const char *path = argv[1];
    double seconds = atof(argv[2]);
    int conns = atoi(argv[3]);
    int size = atoi(argv[4]);
    if (size < 1 || size > 125) {
        fprintf(stderr, "loadtool: ws message size must be 1..125\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    char frame[6 + 125];
    int frame_len = ws_client_frame(frame, size), reply_len = 2 + size;
    char req[512];
    ws_upgrade_request(req, sizeof req, path, argv[0]);
    int ep = epoll_create1(0);
    wconn_t *cs = calloc((size_t)conns, sizeof *cs);
    char head[4096];
    for (int i = 0; i < conns; i++) {
        cs[i].fd = connect_blocking(&to, 5);
        if (cs[i].fd < 0) die("ws connect");
        if (write_all(cs[i].fd, req, strlen(req)) < 0) die("ws handshake write");
        int hl = read_http_head(cs[i].fd, head, sizeof head);
        if (hl < 0 || strncmp(head, "HTTP/1.1 101", 12) != 0) {
            fprintf(stderr, "loadtool: WebSocket handshake refused: %.80s\n", hl < 0 ? "" : head);
            return 2;
        }
        if (strstr(head, "\r\n\r\n") + 4 != head + hl) {
            fprintf(stderr, "loadtool: unexpected bytes after the 101 response\n");
            return 2;
        }
        set_nonblock(cs[i].fd);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, cs[i].fd, &ev);
    }
    samples_t lat = {0};
    long done = 0, errors = 0;
    uint64_t start = now_ns(), end = start + (uint64_t)(seconds * 1e9);
    for (int i = 0; i < conns; i++) {
        cs[i].sent_at = now_ns();
        if (write(cs[i].fd, frame, (size_t)frame_len) != frame_len) die("ws first write");
    }
    char buf[4096];
    struct epoll_event evs[MAX_EVENTS];
    int alive = conns;
    while (now_ns() < end && alive > 0) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, 50);
        for (int k = 0; k < n; k++) {
            wconn_t *c = &cs[evs[k].data.u32];
            ssize_t r = read(c->fd, buf, sizeof buf);
            if (r < 0 && errno == EAGAIN) continue;
            if (r <= 0 || (c->got == 0 && (unsigned char)buf[0] != 0x82)) {
                errors++;
                alive--;
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                continue;
            }
            c->got += (int)r;
            if (c->got >= reply_len) { /* one message in flight: a full reply ends the trip */
                sample_add(&lat, now_ns() - c->sent_at);
                done++;
                c->got = 0;
                c->sent_at = now_ns();
                if (write(c->fd, frame, (size_t)frame_len) != frame_len) {
                    errors++;
                    alive--;
                    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                }
            }
        }
    }
    double secs = (double)(now_ns() - start) / 1e9;
    for (int i = 0; i < conns; i++) close(cs[i].fd);
    sort_samples(&lat);
    printf("{\"messages\": %ld, \"errors\": %ld, \"seconds\": %.4f, \"per_s\": %.1f, "
           "\"p50_us\": %.1f, \"p99_us\": %.1f}\n",
           done, errors, secs, done / secs, percentile_us(&lat, 50), percentile_us(&lat, 99));
    return 0;
}

/* ---------- holding connections open (idle, wsidle) ---------- */

/* Reports the setup, then holds: until stdin has input or closes, or max_hold seconds pass. */
static void report_setup_and_hold(int open_ok, int errors, uint64_t start, int max_hold) {
    printf("{\"open\": %d, \"errors\": %d, \"setup_seconds\": %.3f}\n", open_ok, errors,
           (double)(now_ns() - start) / 1e9);
    fflush(stdout);
    struct pollfd in = {.fd = 0, .events = POLLIN};
    poll(&in, 1, max_hold * 1000);
}

/* 1 while nothing (no EOF, reset or bytes) is pending on fd: the peer has left it open and quiet. */
static int still_open(int fd) {
    struct pollfd p = {.fd = fd, .events = POLLIN | POLLRDHUP};
    return poll(&p, 1, 0) == 0;
}

/* ---------- idle: hold N keep-alive HTTP connections ---------- */

typedef struct {
    int fd, len, done;
    char buf[1024];
} iconn_t;

/* 1 when buf holds a complete response with a 200 status, -1 when it is not a 200, else 0. */
static int response_complete(const char *buf, int len) {
    const char *end = memmem(buf, (size_t)len, "\r\n\r\n", 4);
    if (!end) return 0;
    if (strncmp(buf, "HTTP/1.1 200", 12) != 0) return -1;
    int head = (int)(end - buf) + 4;
    const char *cl = NULL;
    for (const char *p = buf; p < end; p++) {
        if (strncasecmp(p, "\r\ncontent-length:", 17) == 0) {
            cl = p + 17;
            break;
        }
    }
    if (cl) return len >= head + atoi(cl);
    return memmem(buf + head, (size_t)(len - head), "0\r\n\r\n", 5) != NULL; /* chunked */
}

static int cmd_idle(int argc, char **argv) {
    if (argc != 4) return -1;
    struct sockaddr_in to = parse_addr(argv[0]);
    const char *path = argv[1];
    int total = atoi(argv[2]);
    int max_hold = atoi(argv[3]);
    const int batch = 200;
    signal(SIGPIPE, SIG_IGN);
    char req[256];
    int req_len = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: %s\r\n\r\n", path, argv[0]);
    iconn_t *cs = calloc((size_t)total, sizeof *cs);
    int ep = epoll_create1(0);
    int started = 0, open_ok = 0, errors = 0, in_flight = 0;
    uint64_t start = now_ns(), setup_end = start + 60ull * 1000000000ull;
    struct epoll_event evs[MAX_EVENTS];
    while ((open_ok + errors) < total && now_ns() < setup_end) {
        while (in_flight < batch && started < total) {
            iconn_t *c = &cs[started];
            c->fd = start_connect(&to);
            if (c->fd < 0) {
                errors++;
                c->done = -1;
            } else {
                struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)started};
                epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
                in_flight++;
            }
            started++;
        }
        int n = epoll_wait(ep, evs, MAX_EVENTS, 100);
        for (int k = 0; k < n; k++) {
            iconn_t *c = &cs[evs[k].data.u32];
            int finished = 0;
            if (evs[k].events & EPOLLOUT) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err || write(c->fd, req, (size_t)req_len) != req_len) {
                    finished = -1;
                } else {
                    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = evs[k].data.u32};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                }
            } else {
                ssize_t r = read(c->fd, c->buf + c->len, sizeof c->buf - 1 - (size_t)c->len);
                if (r < 0 && errno == EAGAIN) continue;
                if (r <= 0) {
                    finished = -1;
                } else {
                    c->len += (int)r;
                    finished = response_complete(c->buf, c->len);
                    if (finished == 0 && c->len >= (int)sizeof c->buf - 1) finished = -1;
                }
            }
            if (finished != 0) {
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                in_flight--;
                c->done = finished;
                if (finished > 0) {
                    open_ok++;
                } else {
                    errors++;
                    close(c->fd);
                }
            }
        }
    }
    report_setup_and_hold(open_ok, errors, start, max_hold);
    int open_now = 0;
    for (int i = 0; i < started; i++) {
        if (cs[i].done <= 0) continue;
        open_now += still_open(cs[i].fd);
        close(cs[i].fd);
    }
    printf("{\"still_open\": %d}\n", open_now);
    return 0;
}

/* ---------- wsidle: hold N upgraded WebSocket connections ---------- */

enum { W_CONNECTING, W_HEAD, W_ECHO };

typedef struct {
    int fd, state, len, open;
    char buf[1024];
} wiconn_t;

typedef struct {
    int ep, req_len, frame_len, size;
    const char *req, *frame;
} wsidle_t;

/* Sends the message on an open connection and waits for its echo (EPOLLIN). */
static int wsidle_send(const wsidle_t *w, wiconn_t *c, uint32_t id, int op) {
    c->state = W_ECHO;
    c->len = 0;
    if (write(c->fd, w->frame, (size_t)w->frame_len) != w->frame_len) return -1;
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = id};
    return epoll_ctl(w->ep, op, c->fd, &ev) == 0 ? 0 : -1;
}

/* Advances one connection on readiness: connect done -> upgrade request sent -> 101 read ->
 * message sent -> echo read. Returns 1 when the echo arrived, -1 on failure, 0 in between. */
static int wsidle_step(const wsidle_t *w, wiconn_t *c, uint32_t id) {
    if (c->state == W_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err || write(c->fd, w->req, (size_t)w->req_len) != w->req_len) return -1;
        c->state = W_HEAD;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = id};
        return epoll_ctl(w->ep, EPOLL_CTL_MOD, c->fd, &ev) == 0 ? 0 : -1;
    }
    ssize_t r = read(c->fd, c->buf + c->len, sizeof c->buf - 1 - (size_t)c->len);
    if (r < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
    if (r <= 0) return -1;
    c->len += (int)r;
    if (c->state == W_ECHO) return ws_echo_complete(c->buf, c->len, w->size);
    c->buf[c->len] = 0;
    char *end = strstr(c->buf, "\r\n\r\n");
    if (!end) return c->len >= (int)sizeof c->buf - 1 ? -1 : 0;
    /* nothing may follow the 101: the backend speaks only once it is spoken to */
    if (strncmp(c->buf, "HTTP/1.1 101", 12) != 0 || end + 4 != c->buf + c->len) return -1;
    return wsidle_send(w, c, id, EPOLL_CTL_MOD);
}

/* Handles one batch of readiness events; a connection that is done leaves the epoll set and
 * counts in `ok` (its echo arrived, it stays open) or `failed` (it is closed). */
static void wsidle_drive(const wsidle_t *w, wiconn_t *cs, int *in_flight, int *ok, int *failed) {
    struct epoll_event evs[MAX_EVENTS];
    int n = epoll_wait(w->ep, evs, MAX_EVENTS, 100);
    for (int k = 0; k < n; k++) {
        wiconn_t *c = &cs[evs[k].data.u32];
        int res = wsidle_step(w, c, evs[k].data.u32);
        if (res == 0) continue;
        epoll_ctl(w->ep, EPOLL_CTL_DEL, c->fd, NULL);
        (*in_flight)--;
        c->open = res > 0;
        if (res > 0) {
            (*ok)++;
        } else {
            (*failed)++;
            close(c->fd);
            c->fd = -1;
        }
    }
}

/* Opens `total` WebSockets, at most `batch` in progress at once, each upgraded and echoed once. */
static void wsidle_open(const wsidle_t *w, const struct sockaddr_in *to, wiconn_t *cs, int total, int *ok,
                        int *failed) {
    const int batch = 200;
    int started = 0, in_flight = 0;
    uint64_t deadline = now_ns() + 120ull * 1000000000ull;
    while (*ok + *failed < total && now_ns() < deadline) {
        for (; in_flight < batch && started < total; started++) {
            wiconn_t *c = &cs[started];
            c->fd = start_connect(to);
            struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)started};
            if (c->fd >= 0 && epoll_ctl(w->ep, EPOLL_CTL_ADD, c->fd, &ev) == 0) {
                in_flight++;
                continue;
            }
            if (c->fd >= 0) close(c->fd);
            c->fd = -1;
            (*failed)++;
        }
        wsidle_drive(w, cs, &in_flight, ok, failed);
    }
}

/* Sends the message again on `sample` open connections spread over all of them and counts the
 * echoes that come back within 10 s. */
static int wsidle_check(const wsidle_t *w, wiconn_t *cs, int total, int sample, int *sampled) {
    int in_flight = 0, ok = 0, failed = 0;
    int step = sample > 0 && total / sample > 1 ? total / sample : 1;
    *sampled = 0;
    for (int i = 0; i < total && *sampled < sample; i += step) {
        if (!cs[i].open) continue;
        (*sampled)++;
        cs[i].open = 0;
        if (wsidle_send(w, &cs[i], (uint32_t)i, EPOLL_CTL_ADD) == 0) {
            in_flight++;
        } else {
            failed++;
        }
    }
    uint64_t deadline = now_ns() + 10ull * 1000000000ull;
    while (in_flight > 0 && now_ns() < deadline) wsidle_drive(w, cs, &in_flight, &ok, &failed);
    return ok;
}

static int cmd_wsidle(int argc, char **argv) {
    if (argc != 5) return -1;
    struct sockaddr_in to = parse_addr(argv[0]);
    int total = atoi(argv[2]), max_hold = atoi(argv[3]), sample = atoi(argv[4]);
    if (total < 1) {
        fprintf(stderr, "loadtool: wsidle needs N >= 1\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    char req[512], frame[6 + 125];
    wsidle_t w = {.ep = epoll_create1(0), .size = 16, .req = req, .frame = frame};
    if (w.ep < 0) die("epoll_create1");
    w.req_len = ws_upgrade_request(req, sizeof req, argv[1], argv[0]);
    w.frame_len = ws_client_frame(frame, w.size);
    wiconn_t *cs = calloc((size_t)total, sizeof *cs);
    if (!cs) die("calloc");
    int open_ok = 0, errors = 0;
    uint64_t start = now_ns();
    wsidle_open(&w, &to, cs, total, &open_ok, &errors);
    report_setup_and_hold(open_ok, errors, start, max_hold);
    /* A close frame or ping pending counts as not open, as EOF and reset do. */
    int open_now = 0;
    for (int i = 0; i < total; i++)
        if (cs[i].open) open_now += still_open(cs[i].fd);
    int sampled = 0;
    int echo_ok = wsidle_check(&w, cs, total, sample, &sampled);
    for (int i = 0; i < total; i++)
        if (cs[i].fd >= 0) close(cs[i].fd);
    printf("{\"still_open\": %d, \"sampled\": %d, \"echo_ok\": %d}\n", open_now, sampled, echo_ok);
    return 0;
}

int main(int argc, char **argv) {
    int rc = -1;
    if (argc >= 2) {
        const char *cmd = argv[1];
        if (!strcmp(cmd, "serve")) rc = cmd_serve(argc - 2, argv + 2);
        else if (!strcmp(cmd, "bulk")) rc = cmd_bulk(argc - 2, argv + 2);
        else if (!strcmp(cmd, "connrate")) rc = cmd_connrate(argc - 2, argv + 2);
        else if (!strcmp(cmd, "ws")) rc = cmd_ws(argc - 2, argv + 2);
        else if (!strcmp(cmd, "idle")) rc = cmd_idle(argc - 2, argv + 2);
        else if (!strcmp(cmd, "wsidle")) rc = cmd_wsidle(argc - 2, argv + 2);
    }
    if (rc == -1) {
        fprintf(stderr,
                "usage: loadtool serve SINK_ADDR ECHO_ADDR WS_ADDR MAX_SECONDS\n"
                "       loadtool bulk ADDR SECONDS CONNS\n"
                "       loadtool connrate ADDR SECONDS CONC\n"
                "       loadtool ws ADDR PATH SECONDS CONNS MSG_BYTES\n"
                "       loadtool idle ADDR PATH N MAX_HOLD_SECONDS\n"
                "       loadtool wsidle ADDR PATH N MAX_HOLD_SECONDS SAMPLE\n");
        return 2;
    }
    return rc;
}
