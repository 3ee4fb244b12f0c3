/* replay_main.c — runs a libFuzzer harness without libFuzzer: every argument is a file or a directory
 * of files (not recursive), each file's bytes are passed once to LLVMFuzzerTestOneInput. This is how CI
 * replays the committed corpus (tests/fuzz/corpus/<target>/) as a regression test under gcc.
 * Owns nothing else; the harness aborts on a broken invariant, which fails the test. */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int run_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "replay: cannot open %s\n", path);
        return -1;
    }
    size_t cap = 4096, len = 0;
    unsigned char *buf = malloc(cap);
    size_t got;
    while (buf && (got = fread(buf + len, 1, cap - len, f)) > 0) {
        len += got;
        if (len == cap) {
            unsigned char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
    }
    fclose(f);
    if (!buf) {
        fprintf(stderr, "replay: out of memory reading %s\n", path);
        return -1;
    }
    /* an exact-size copy, so ASan builds see reads past the end */
    unsigned char *exact = malloc(len ? len : 1);
    if (!exact) {
        free(buf);
        return -1;
    }
    memcpy(exact, buf, len);
    free(buf);
    LLVMFuzzerTestOneInput(exact, len);
    free(exact);
    return 0;
}

static int name_cmp(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int main(int argc, char **argv) {
    int n_files = 0, failures = 0;
    for (int a = 1; a < argc; a++) {
        struct stat sb;
        if (stat(argv[a], &sb) != 0) {
            fprintf(stderr, "replay: %s: no such file or directory\n", argv[a]);
            failures++;
            continue;
        }
        if (!S_ISDIR(sb.st_mode)) {
            failures += run_file(argv[a]) != 0;
            n_files++;
            continue;
        }
        DIR *d = opendir(argv[a]);
        if (!d) {
            failures++;
            continue;
        }
        char **names = NULL;
        size_t n = 0, cap = 0;
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            if (e->d_name[0] == '.') continue;
            if (n == cap) {
                cap = cap ? cap * 2 : 64;
                char **nn = realloc(names, cap * sizeof *nn);
                if (!nn) break;
                names = nn;
            }
            size_t pl = strlen(argv[a]) + strlen(e->d_name) + 2;
            names[n] = malloc(pl);
            if (!names[n]) break;
            snprintf(names[n], pl, "%s/%s", argv[a], e->d_name);
            n++;
        }
        closedir(d);
        if (n) qsort(names, n, sizeof *names, name_cmp);
        for (size_t i = 0; i < n; i++) {
            struct stat fs;
            if (stat(names[i], &fs) == 0 && S_ISREG(fs.st_mode)) {
                failures += run_file(names[i]) != 0;
                n_files++;
            }
            free(names[i]);
        }
        free(names);
    }
    printf("replay: %d inputs, %d unreadable\n", n_files, failures);
    if (n_files == 0) {
        fprintf(stderr, "replay: no inputs given (empty corpus?)\n");
        return 1;
    }
    return failures ? 1 : 0;
}
