/* A static tool for sysroot tests (tests/it/exec_views.rs): prints the path it was started
 * as, then for each argument: "w:PATH:TEXT" writes TEXT to PATH (folders made as needed),
 * "?PATH" prints whether PATH exists in its view. */
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

static int write_file(char *spec) {
    char *path = spec + 2, *text = strchr(path, ':');
    if (!text) return 2;
    *text++ = 0;
    for (char *p = path + 1; *p; p++) {
        if (*p == '/') { *p = 0; mkdir(path, 0755); *p = '/'; }
    }
    FILE *f = fopen(path, "w");
    if (!f) { perror(path); return 1; }
    fputs(text, f);
    return fclose(f) ? 1 : 0;
}

int main(int argc, char **argv) {
    printf("argv0=%s\n", argv[0]);
    for (int i = 1; i < argc; i++) {
        struct stat st;
        if (!strncmp(argv[i], "w:", 2)) {
            if (write_file(argv[i])) return 1;
        } else if (argv[i][0] == '?') {
            printf("%s %s\n", argv[i] + 1, stat(argv[i] + 1, &st) == 0 ? "present" : "absent");
        }
    }
    return 0;
}
