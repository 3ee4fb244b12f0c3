/* fuzz_ini.c — fuzz target for the INI run-file layer (host/runtime/config.c).
 * Owns: loading arbitrary text with kvh_config_load_string and, when it loads, checking the normalized
 * write-back: kvh_config_write_ini's text must load again, and writing that second configuration must
 * give the same text byte for byte (so a saved run reproduces the run). Plugins are never loaded: the
 * plugin sections stay text, as the router would receive them. Does not own the config parser. */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/config.h"

#define CHECK(cond)                                                                       \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            fprintf(stderr, "fuzz_ini: invariant failed: %s (line %d)\n", #cond, __LINE__); \
            abort();                                                                      \
        }                                                                                 \
    } while (0)

/* cfg as normalized INI text (malloc'd, NUL-terminated). */
static char *write_text(const kvh_run_config *cfg, size_t *len) {
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    CHECK(f != NULL);
    CHECK(kvh_config_write_ini(cfg, f) == 0);
    CHECK(fclose(f) == 0);
    *len = n;
    return buf;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 256 * 1024) return 0;
    char *text = malloc(size + 1);
    if (!text) return 0;
    if (size) memcpy(text, data, size);
    text[size] = '\0'; /* the API takes a C string: embedded NULs end it early, as a file read would not */
    kvh_run_config cfg;
    kvh_config_defaults(&cfg);
    kvh_err err;
    err.msg[0] = '\0';
    if (kvh_config_load_string(&cfg, text, "fuzz.ini", &err) != 0) {
        CHECK(err.msg[0] != '\0');
        kvh_config_free(&cfg);
        free(text);
        return 0;
    }
    size_t len1 = 0, len2 = 0;
    char *t1 = write_text(&cfg, &len1);
    kvh_run_config cfg2;
    kvh_config_defaults(&cfg2);
    if (kvh_config_load_string(&cfg2, t1, "normalized.ini", &err) != 0) {
        fprintf(stderr, "fuzz_ini: normalized text does not load back: %s\n--- text ---\n%s\n", err.msg, t1);
        abort();
    }
    CHECK(cfg2.n_sections == cfg.n_sections && cfg2.budget == cfg.budget && cfg2.slack == cfg.slack);
    CHECK(cfg2.threads == cfg.threads && strcmp(cfg2.backend, cfg.backend) == 0);
    CHECK((cfg.model == NULL) == (cfg2.model == NULL));
    if (cfg.model) CHECK(strcmp(cfg.model, cfg2.model) == 0);
    char *t2 = write_text(&cfg2, &len2);
    if (len1 != len2 || memcmp(t1, t2, len1) != 0) {
        fprintf(stderr, "fuzz_ini: write/reload/write differs\n--- first ---\n%s\n--- second ---\n%s\n", t1, t2);
        abort();
    }
    free(t1);
    free(t2);
    kvh_config_free(&cfg2);
    kvh_config_free(&cfg);
    free(text);
    return 0;
}
