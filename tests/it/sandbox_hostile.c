/* A hostile action for the sandbox tests: tries to get out and reports every probe that
 * succeeded as a line starting with LEAK. Compiled with gcc at test time.
 *
 *   hostile escape|stay MARKER SECRET TEST_PID SERVER_PID PORT
 *     escape: the classic chroot escape first (chroot into a subfolder, chdir("..") 64
 *             times, chroot(".")), then the probes; stay: the probes only.
 *     probes: create MARKER, read SECRET, see /proc/TEST_PID, signal TEST_PID (kill 0),
 *             setns into /proc/SERVER_PID/ns/net, connect to 127.0.0.1:PORT.
 *   hostile alloc MIB      allocates MIB MiB in 64 MiB chunks, touching every page. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

static void leak(const char *what, const char *detail) {
    printf("LEAK %s %s\n", what, detail);
    fflush(stdout);
}

static void probes(char **a) {
    const char *marker = a[0], *secret = a[1], *test_pid = a[2], *server_pid = a[3];
    int port = atoi(a[4]);
    char path[256];
    int fd = open(marker, O_CREAT | O_WRONLY, 0644);
    if (fd >= 0) {
        if (write(fd, "escaped\n", 8) == 8) leak("wrote", marker);
        close(fd);
    }
    char buf[256];
    fd = open(secret, O_RDONLY);
    if (fd >= 0) {
        ssize_t n = read(fd, buf, sizeof buf - 1);
        if (n > 0) {
            buf[n] = 0;
            leak("read", secret);
        }
        close(fd);
    }
    snprintf(path, sizeof path, "/proc/%s/status", test_pid);
    if (access(path, F_OK) == 0) leak("sees-host-process", test_pid);
    if (kill(atoi(test_pid), 0) == 0) leak("can-signal", test_pid);
    snprintf(path, sizeof path, "/proc/%s/ns/net", server_pid);
    fd = open(path, O_RDONLY);
    if (fd >= 0 && setns(fd, CLONE_NEWNET) == 0) leak("setns-net", server_pid);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (s >= 0 && connect(s, (struct sockaddr *)&sa, sizeof sa) == 0) leak("connected", a[4]);
    printf("probes done\n");
}

static int escape(void) {
    mkdir("jail", 0755);
    if (chroot("jail") != 0) {
        printf("chroot: %s\n", strerror(errno));
        return -1;
    }
    for (int i = 0; i < 64; i++)
        if (chdir("..") != 0) break;
    if (chroot(".") != 0) {
        printf("chroot(.): %s\n", strerror(errno));
        return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 3 && strcmp(argv[1], "alloc") == 0) {
        long mib = atol(argv[2]);
        for (long done = 0; done < mib; done += 64) {
            char *p = malloc(64L << 20);
            if (!p) {
                printf("malloc failed after %ld MiB\n", done);
                return 2;
            }
            memset(p, 1, 64L << 20);
            printf("allocated %ld MiB\n", done + 64);
        }
        printf("allocated everything\n");
        return 0;
    }
    if (argc != 7) {
        fprintf(stderr, "usage: hostile escape|stay MARKER SECRET TEST_PID SERVER_PID PORT\n");
        return 2;
    }
    if (strcmp(argv[1], "escape") == 0) escape();
    probes(argv + 2);
    return 0;
}
