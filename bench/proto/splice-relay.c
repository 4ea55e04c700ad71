/*
 * Does splice/tee save CPU when a primary forwards a large write to its peer and its own
 * page cache?  A stand-alone model of that hop, outside the daemon, so the answer comes
 * before any rewrite of the data path.
 *
 *   src  --TCP-->  relay  --TCP-->  sink
 *                    |
 *                    +--> image file (page cache)
 *
 * relay "copy":   read() the chunk, pwrite() it, write() it on: three copies, like the
 *                 daemon's primary today.
 * relay "splice": splice() socket -> pipe, tee() pipe -> pipe2, splice() pipe -> file,
 *                 splice() pipe2 -> socket: no copy in or out of user memory.
 * The sink reads each chunk and writes it with O_DIRECT, like the daemon's secondary.
 *
 * Environment: CRC=1 adds zlib's crc32 in the relay's copy mode; NOFILE=1 drops the file
 * write (the pipe is drained into /dev/null instead), to see the network part alone.
 * Usage: bench/proto/splice-relay.sh (builds this, runs it in a private network namespace).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#define CHUNK (1 << 20)
#define FILE_CHUNKS 256 /* the image is 256 MiB, rewritten in a loop */

static void die(const char *what) { perror(what); exit(1); }

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static double cpu_us(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec * 1e6 + ru.ru_utime.tv_usec + ru.ru_stime.tv_sec * 1e6 +
           ru.ru_stime.tv_usec;
}

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

static int accept_one(int port) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = loopback(port);
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (void *)&a, sizeof a) || listen(s, 1)) die("bind/listen");
    int c = accept(s, 0, 0);
    if (c < 0) die("accept");
    return c;
}

static int dial(int port) {
    struct sockaddr_in a = loopback(port);
    for (int attempt = 0; attempt < 200; attempt++) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (!connect(s, (void *)&a, sizeof a)) return s;
        close(s);
        usleep(10000);
    }
    die("connect");
    return -1;
}

static void read_all(int fd, char *b, size_t n) {
    while (n) {
        ssize_t r = read(fd, b, n);
        if (r <= 0) die("read");
        b += r, n -= r;
    }
}

static void write_all(int fd, const char *b, size_t n) {
    while (n) {
        ssize_t r = write(fd, b, n);
        if (r <= 0) die("write");
        b += r, n -= r;
    }
}

/* splice() until exactly n bytes moved; off may be NULL (sockets, pipes). */
static void splice_all(int from, int to, loff_t *off, size_t n, unsigned flags) {
    while (n) {
        ssize_t r = splice(from, NULL, to, off, n, flags);
        if (r <= 0) die("splice");
        n -= r;
    }
}

static void src(int chunks) {
    int s = dial(9001);
    char *b = malloc(CHUNK), done;
    for (int i = 0; i < CHUNK; i++) b[i] = rand();
    for (int i = 0; i < chunks; i++) write_all(s, b, CHUNK);
    read_all(s, &done, 1);
}

static void sink(int chunks, const char *image) {
    int s = accept_one(9002);
    int f = open(image, O_WRONLY | O_CREAT | O_DIRECT, 0644);
    char *b = aligned_alloc(4096, CHUNK);
    if (f < 0) die("open sink image");
    for (int i = 0; i < chunks; i++) {
        read_all(s, b, CHUNK);
        if (pwrite(f, b, CHUNK, (off_t)(i % FILE_CHUNKS) * CHUNK) != CHUNK) die("pwrite");
    }
    write_all(s, "k", 1);
    fprintf(stderr, "sink:  cpu %.0f us/MiB\n", cpu_us() / chunks);
}

static void relay(int chunks, const char *mode, const char *image) {
    int in = accept_one(9001), out = dial(9002);
    int f = open(image, O_WRONLY | O_CREAT, 0644), devnull = open("/dev/null", O_WRONLY);
    int to_file = getenv("NOFILE") == NULL, with_crc = getenv("CRC") != NULL;
    unsigned long crc = 0;
    char done;
    if (f < 0 || ftruncate(f, (off_t)FILE_CHUNKS * CHUNK)) die("relay image");
    double t0 = seconds(), cpu0 = cpu_us();
    if (!strcmp(mode, "copy")) {
        char *b = malloc(CHUNK);
        for (int i = 0; i < chunks; i++) {
            read_all(in, b, CHUNK);
            if (with_crc) crc ^= crc32(0, (void *)b, CHUNK);
            if (to_file && pwrite(f, b, CHUNK, (off_t)(i % FILE_CHUNKS) * CHUNK) != CHUNK)
                die("pwrite");
            write_all(out, b, CHUNK);
        }
    } else {
        int p1[2], p2[2];
        if (pipe(p1) || pipe(p2)) die("pipe");
        if (fcntl(p1[0], F_SETPIPE_SZ, CHUNK) < 0 || fcntl(p2[0], F_SETPIPE_SZ, CHUNK) < 0)
            die("F_SETPIPE_SZ");
        for (int i = 0; i < chunks; i++) {
            splice_all(in, p1[1], NULL, CHUNK, SPLICE_F_MOVE);
            for (size_t teed = 0; teed < CHUNK;) {
                ssize_t r = tee(p1[0], p2[1], CHUNK - teed, 0);
                if (r <= 0) die("tee");
                teed += r;
            }
            loff_t off = (loff_t)(i % FILE_CHUNKS) * CHUNK;
            if (to_file)
                splice_all(p1[0], f, &off, CHUNK, SPLICE_F_MOVE);
            else
                splice_all(p1[0], devnull, NULL, CHUNK, SPLICE_F_MOVE);
            splice_all(p2[0], out, NULL, CHUNK, SPLICE_F_MOVE | SPLICE_F_MORE);
        }
    }
    read_all(out, &done, 1);
    write_all(in, "k", 1);
    double dt = seconds() - t0;
    fprintf(stderr, "relay %-6s %s: %4.0f MiB/s, cpu %4.0f us/MiB%s\n", mode,
            to_file ? "file+peer" : "peer only", chunks / dt, (cpu_us() - cpu0) / chunks,
            with_crc ? " (with zlib crc32)" : "");
    (void)crc;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s src|sink|relay CHUNKS [copy|splice] IMAGE\n", argv[0]);
        return 2;
    }
    int chunks = atoi(argv[2]);
    if (!strcmp(argv[1], "src")) src(chunks);
    else if (!strcmp(argv[1], "sink") && argc > 3) sink(chunks, argv[3]);
    else if (!strcmp(argv[1], "relay") && argc > 4) relay(chunks, argv[3], argv[4]);
    else { fprintf(stderr, "bad arguments\n"); return 2; }
    return 0;
}
