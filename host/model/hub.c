/* hub.c — implementation of hub.h. Reads only directory names and refs/main; never the network. */
#include "model/hub.h"

#include <dirent.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* ORG/NAME or NAME: letters, digits, '.', '_', '-'; no part empty, starting with '.' or '-', or "..". */
static bool is_hub_id(const char *s) {
    int slashes = 0;
    size_t part = 0;
    for (const char *c = s;; c++) {
        if (*c == '/' || *c == '\0') {
            if (part == 0 || part > 96) return false;
            const char *start = c - part;
            if (start[0] == '.' || start[0] == '-' || strstr(start, "..") == start) return false;
            if (*c == '\0') break;
            if (++slashes > 1) return false;
            part = 0;
            continue;
        }
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') || *c == '.' ||
              *c == '_' || *c == '-'))
            return false;
        part++;
    }
    return strstr(s, "..") == NULL;
}

static void cache_root(char *out, size_t cap) {
    const char *v;
    if ((v = getenv("HF_HUB_CACHE")) && *v) snprintf(out, cap, "%s", v);
    else if ((v = getenv("HF_HOME")) && *v) snprintf(out, cap, "%s/hub", v);
    else if ((v = getenv("XDG_CACHE_HOME")) && *v) snprintf(out, cap, "%s/huggingface/hub", v);
    else snprintf(out, cap, "%s/.cache/huggingface/hub", (v = getenv("HOME")) && *v ? v : ".");
}

static bool has_config(const char *dir) {
    char p[4096];
    struct stat sb;
    if (snprintf(p, sizeof p, "%s/config.json", dir) >= (int)sizeof p) return false;
    return stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
}

/* A snapshot of repo directory `repo` (…/models--ORG--NAME): refs/main's, else the newest with config.json. */
static bool find_snapshot(const char *repo, char *out, size_t cap) {
    char p[4096], rev[128] = "";
    if (snprintf(p, sizeof p, "%s/refs/main", repo) >= (int)sizeof p) return false;
    FILE *f = fopen(p, "r");
    if (f) {
        if (fgets(rev, sizeof rev, f)) rev[strcspn(rev, "\r\n")] = '\0';
        fclose(f);
        bool hex = rev[0] != '\0';
        for (const char *c = rev; *c; c++) hex &= (*c >= '0' && *c <= '9') || (*c >= 'a' && *c <= 'f');
        if (hex && (size_t)snprintf(out, cap, "%s/snapshots/%s", repo, rev) < cap && has_config(out)) return true;
    }
    if (snprintf(p, sizeof p, "%s/snapshots", repo) >= (int)sizeof p) return false;
    DIR *d = opendir(p);
    if (!d) return false;
    struct dirent *e;
    double newest = -1;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char s[4096];
        struct stat sb;
        if (snprintf(s, sizeof s, "%s/%s", p, e->d_name) >= (int)sizeof s) continue;
        if (stat(s, &sb) != 0 || !S_ISDIR(sb.st_mode) || !has_config(s)) continue;
        double t = (double)sb.st_mtime;
        if (t > newest && strlen(s) < cap) {
            newest = t;
            snprintf(out, cap, "%s", s);
        }
    }
    closedir(d);
    return newest >= 0;
}

int kvh_hub_resolve(const char *spec, char *out, size_t cap, kvh_err *err) {
    if (!is_hub_id(spec)) return 0;
    char root[2048], repo[4096], tried[4096];
    cache_root(root, sizeof root);
    const char *slash = strchr(spec, '/');
    /* a bare NAME: the hub's legacy id (models--gpt2) or its current home under openai-community */
    const char *orgs[2] = {NULL, slash ? NULL : "openai-community"};
    for (int i = 0; i < 2; i++) {
        if (i == 1 && !orgs[1]) break;
        if (slash) snprintf(repo, sizeof repo, "%s/models--%.*s--%s", root, (int)(slash - spec), spec, slash + 1);
        else if (i == 0) snprintf(repo, sizeof repo, "%s/models--%s", root, spec);
        else snprintf(repo, sizeof repo, "%s/models--%s--%s", root, orgs[1], spec);
        if (i == 0) snprintf(tried, sizeof tried, "%s", repo);
        if (find_snapshot(repo, out, cap)) return 1;
    }
    const char *name = slash ? slash + 1 : spec;
    return kvh_fail(err, "model '%s': not a directory, and no downloaded copy in the Hugging Face cache (%s%s). "
                    "HINT: on a machine with internet access: huggingface-cli download %s%s --local-dir "
                    "~/models/%s, then --model ~/models/%s", spec, tried, slash ? "" : " or its openai-community "
                    "name", slash ? "" : "openai-community/", spec, name, name);
}
