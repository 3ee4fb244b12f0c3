/* safetensors.c — reading and validating the safetensors container (see safetensors.h for the format).
 * Owns: mmap of the file, header JSON validation (dtype, shape, data_offsets, sizes, overlaps, duplicate
 * names), tensor lookup, F32/F16/BF16 -> fp32 conversion. Does not own: what tensors mean or which
 * dtypes a caller accepts (model.c decides; KVH_ST_OTHER marks valid dtypes the host cannot use).
 * Every error names the file and, where one is involved, the tensor. */
#define _POSIX_C_SOURCE 200809L
#include "model/safetensors.h"

#include "util/json_scan.h"
#include "util/mmap_guard.h"

#include <assert.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* The reference implementation refuses headers above 100 MB; so do we (a hostile length cannot make
 * cJSON allocate more than a bounded amount). */
#define ST_MAX_HEADER_BYTES ((uint64_t)100 * 1000 * 1000)
/* JSON numbers are doubles: integers above 2^53 are not exact, so offsets/dims beyond it are refused. */
#define ST_MAX_JSON_INT 9007199254740992.0
/* One tensor entry ({"dtype": .., "shape": [<= 8 dims], "data_offsets": [b, e]}) is ~150 bytes; a generous
 * bound keeps the one cJSON tree built at a time small whatever the header holds. */
#define ST_MAX_ENTRY_BYTES 65536

typedef struct dtype_info {
    const char *name;
    kvh_st_dtype dtype;
    size_t size; /* bytes per element */
} dtype_info;

/* The safetensors dtypes with a whole number of bytes per element. */
static const dtype_info DTYPES[] = {
    {"F32", KVH_ST_F32, 4},       {"F16", KVH_ST_F16, 2},         {"BF16", KVH_ST_BF16, 2},
    {"F64", KVH_ST_OTHER, 8},     {"I64", KVH_ST_OTHER, 8},       {"U64", KVH_ST_OTHER, 8},
    {"I32", KVH_ST_OTHER, 4},     {"U32", KVH_ST_OTHER, 4},       {"I16", KVH_ST_OTHER, 2},
    {"U16", KVH_ST_OTHER, 2},     {"I8", KVH_ST_OTHER, 1},        {"U8", KVH_ST_OTHER, 1},
    {"BOOL", KVH_ST_OTHER, 1},    {"F8_E4M3", KVH_ST_OTHER, 1},   {"F8_E5M2", KVH_ST_OTHER, 1},
    {"F8_E8M0", KVH_ST_OTHER, 1}, {"C64", KVH_ST_OTHER, 8},
};

static const dtype_info *dtype_lookup(const char *name) {
    for (size_t i = 0; i < sizeof DTYPES / sizeof DTYPES[0]; i++)
        if (strcmp(DTYPES[i].name, name) == 0) return &DTYPES[i];
    return NULL;
}

/* A JSON number that is a non-negative integer exactly representable as a double. */
static int json_uint(const cJSON *item, uint64_t *out) {
    if (!cJSON_IsNumber(item)) return -1;
    double v = item->valuedouble;
    if (!(v >= 0.0) || v > ST_MAX_JSON_INT || v != floor(v)) return -1;
    *out = (uint64_t)v;
    return 0;
}

/* Header entry -> tensor; data points into `data` (the data section of data_len bytes). `begin` and
 * `end` are returned for the overlap check. */
static int parse_entry(const cJSON *e, const char *name, const char *path, const unsigned char *data,
                       uint64_t data_len, kvh_st_tensor *t, uint64_t *begin_out, uint64_t *end_out, kvh_err *err) {
    if (!cJSON_IsObject(e))
        return kvh_fail(err, "%s: tensor '%s': header entry is not a JSON object", path, name);

    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    if (!dt) return kvh_fail(err, "%s: tensor '%s': missing \"dtype\"", path, name);
    if (!cJSON_IsString(dt))
        return kvh_fail(err, "%s: tensor '%s': \"dtype\" is not a string", path, name);
    const dtype_info *di = dtype_lookup(dt->valuestring);
    if (!di)
        return kvh_fail(err, "%s: tensor '%s': unknown dtype '%.32s' (known: F32 F16 BF16 F64 I64 U64 "
                        "I32 U32 I16 U16 I8 U8 BOOL F8_E4M3 F8_E5M2 F8_E8M0 C64)", path, name,
                        dt->valuestring);
    t->dtype = di->dtype;
    snprintf(t->dtype_name, sizeof t->dtype_name, "%s", di->name);

    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(e, "shape");
    if (!shape) return kvh_fail(err, "%s: tensor '%s': missing \"shape\"", path, name);
    if (!cJSON_IsArray(shape))
        return kvh_fail(err, "%s: tensor '%s': \"shape\" is not an array", path, name);
    int nd = cJSON_GetArraySize(shape);
    if (nd > KVH_ST_MAX_DIMS)
        return kvh_fail(err, "%s: tensor '%s': shape has %d dimensions, at most %d supported", path, name,
                        nd, KVH_ST_MAX_DIMS);
    t->n_dims = nd;
    size_t n_elems = 1;
    bool overflow = false;
    int d = 0;
    const cJSON *dim;
    cJSON_ArrayForEach(dim, shape) {
        uint64_t v;
        if (json_uint(dim, &v) != 0)
            return kvh_fail(err, "%s: tensor '%s': shape[%d] is not a non-negative integer", path, name, d);
        t->shape[d++] = (int64_t)v;
        if (v > SIZE_MAX || kvh_size_mul(n_elems, (size_t)v, &n_elems) != 0) overflow = true;
    }
    size_t n_bytes = 0;
    if (overflow || kvh_size_mul(n_elems, di->size, &n_bytes) != 0)
        return kvh_fail(err, "%s: tensor '%s': shape product times %zu-byte %s overflows size_t", path,
                        name, di->size, di->name);
    t->n_elems = n_elems;
    t->n_bytes = n_bytes;

    const cJSON *offs = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!offs) return kvh_fail(err, "%s: tensor '%s': missing \"data_offsets\"", path, name);
    uint64_t begin, end;
    if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2 ||
        json_uint(cJSON_GetArrayItem(offs, 0), &begin) != 0 ||
        json_uint(cJSON_GetArrayItem(offs, 1), &end) != 0)
        return kvh_fail(err, "%s: tensor '%s': \"data_offsets\" must be [begin, end] with non-negative "
                        "integers", path, name);
    if (begin > end)
        return kvh_fail(err, "%s: tensor '%s': data_offsets [%llu, %llu] has begin > end", path, name,
                        (unsigned long long)begin, (unsigned long long)end);
    if (end > data_len)
        return kvh_fail(err, "%s: tensor '%s': data_offsets [%llu, %llu] end beyond data section of "
                        "%llu bytes", path, name, (unsigned long long)begin, (unsigned long long)end,
                        (unsigned long long)data_len);
    if (end - begin != (uint64_t)n_bytes)
        return kvh_fail(err, "%s: tensor '%s': data_offsets [%llu, %llu] hold %llu bytes but shape and "
                        "dtype %s need %zu bytes", path, name, (unsigned long long)begin,
                        (unsigned long long)end, (unsigned long long)(end - begin), di->name, n_bytes);
    t->data = data + begin;
    *begin_out = begin;
    *end_out = end;
    return 0;
}

typedef struct span {
    uint64_t begin, end;
    int idx;
} span;

static int span_cmp(const void *a, const void *b) {
    const span *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

static int name_cmp(const void *a, const void *b) {
    const kvh_st_tensor *x = *(const kvh_st_tensor *const *)a, *y = *(const kvh_st_tensor *const *)b;
    return strcmp(x->name, y->name);
}

void kvh_st_close(kvh_safetensors *st) {
    if (!st) return;
    if (st->tensors) {
        for (int i = 0; i < st->n_tensors; i++) free(st->tensors[i].name);
        free(st->tensors);
    }
    if (st->map_base) {
        kvh_mmap_guard_remove(st->map_base);
        munmap(st->map_base, st->map_len);
    }
    memset(st, 0, sizeof *st);
}

/* Walks the members of the header's top-level object. *kstart is the key's opening quote, [*vstart, *vend)
 * the value's text (validated, objects and arrays nested at most 2 deep: a tensor entry and its shape /
 * data_offsets arrays). Returns 1 for a member, 0 after the closing '}', -1 on a syntax error (j->error). */
static int member_next(kvh_json_scan *j, int first, size_t *kstart, size_t *vstart, size_t *vend) {
    kvh_json_ws(j);
    if (j->at >= j->len) {
        j->error = "unexpected end of the header (',' or '}' was expected)";
        return -1;
    }
    if (j->s[j->at] == '}' && first) {
        j->at++;
        return 0;
    }
    if (!first) {
        if (j->s[j->at] == '}') {
            j->at++;
            return 0;
        }
        if (j->s[j->at] != ',') {
            j->error = "expected ',' or '}' after a header entry";
            return -1;
        }
        j->at++;
        kvh_json_ws(j);
    }
    *kstart = j->at;
    if (j->at >= j->len || j->s[j->at] != '"') {
        j->error = "expected a tensor name string";
        return -1;
    }
    if (kvh_json_string(j, NULL, NULL) != 0) return -1;
    kvh_json_ws(j);
    if (j->at >= j->len || j->s[j->at] != ':') {
        j->error = "expected ':' after a tensor name";
        return -1;
    }
    j->at++;
    kvh_json_ws(j);
    *vstart = j->at;
    if (kvh_json_skip_value(j, 2, NULL) != 0) return -1;
    *vend = j->at;
    return 1;
}

/* Whether the (already validated) key string at text[ks] decodes to "__metadata__". */
static bool is_metadata_key(const char *text, size_t len, size_t ks) {
    kvh_json_scan k = {.s = text, .len = len, .at = ks};
    if (kvh_json_string(&k, NULL, NULL) != 0 || k.at - ks > 80) return false; /* longer than any escaping */
    char name[80];
    size_t n = 0;
    k.at = ks;
    if (kvh_json_string(&k, name, &n) != 0) return false;
    return n == 12 && memcmp(name, "__metadata__", 12) == 0;
}

/* __metadata__ is a map of string to string in the format (the reference implementation deserializes it
 * as HashMap<String, String>); anything else is refused before it can cost memory. */
static int metadata_check(const char *text, size_t len) {
    kvh_json_scan j = {.s = text, .len = len};
    if (j.len == 0 || text[0] != '{') return -1;
    j.at = 1;
    kvh_json_ws(&j);
    if (j.at < j.len && text[j.at] == '}') return 0;
    for (;;) {
        kvh_json_ws(&j);
        if (kvh_json_string(&j, NULL, NULL) != 0) return -1;
        kvh_json_ws(&j);
        if (j.at >= j.len || text[j.at] != ':') return -1;
        j.at++;
        kvh_json_ws(&j);
        if (kvh_json_string(&j, NULL, NULL) != 0) return -1;
        kvh_json_ws(&j);
        if (j.at >= j.len) return -1;
        if (text[j.at] == '}') return 0;
        if (text[j.at] != ',') return -1;
        j.at++;
    }
}

int kvh_st_parse(kvh_safetensors *st, const void *buf, size_t len, const char *path, kvh_err *err) {
    memset(st, 0, sizeof *st);
    snprintf(st->path, sizeof st->path, "%s", path);
    const unsigned char *b = buf;
    /* a git-lfs pointer (a clone without `git lfs pull`): ~130 bytes of text whose first 8 bytes would
     * read as a header length of 2.3e18 */
    static const char lfs[] = "version https://git-lfs.github.com/spec/";
    if (len >= sizeof lfs - 1 && memcmp(b, lfs, sizeof lfs - 1) == 0)
        return kvh_fail(err, "%s: this is a git-lfs pointer file (%zu bytes of text), not the weights: run "
                        "`git lfs install && git lfs pull` in the clone, or download with `huggingface-cli "
                        "download ORG/NAME --local-dir DIR`", path, len);
    if (len < 8)
        return kvh_fail(err, "%s: file is %zu bytes, too short for the 8-byte safetensors header length "
                        "(truncated or not a safetensors file)", path, len);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | b[i];
    if (hlen > (uint64_t)(len - 8))
        return kvh_fail(err, "%s: header length %llu is beyond the file (%zu bytes after the length "
                        "field): truncated or not a safetensors file", path, (unsigned long long)hlen,
                        len - 8);
    if (hlen > ST_MAX_HEADER_BYTES)
        return kvh_fail(err, "%s: header length %llu exceeds the limit of %llu bytes", path,
                        (unsigned long long)hlen, (unsigned long long)ST_MAX_HEADER_BYTES);
    if (hlen < 2) return kvh_fail(err, "%s: header length %llu is too small for a JSON object", path,
                                  (unsigned long long)hlen);

    /* The header is never parsed into one tree (cJSON spends ~80 bytes per value, so a 100 MB header of
     * tiny values would take gigabytes): pass 1 validates the syntax member by member and counts the
     * tensors; pass 2 parses each tensor entry (a few hundred bytes) on its own. Memory is the tensor
     * table, about 4x the header at worst, plus one entry's tree. */
    const char *htext = (const char *)b + 8;
    kvh_json_scan j = {.s = htext, .len = (size_t)hlen};
    kvh_json_ws(&j);
    if (j.at >= j.len || htext[j.at] != '{') {
        if (j.at < j.len && htext[j.at] == '[') return kvh_fail(err, "%s: header is not a JSON object", path);
        kvh_json_scan v = j;
        if (kvh_json_skip_value(&v, 64, NULL) == 0) return kvh_fail(err, "%s: header is not a JSON object", path);
        return kvh_fail(err, "%s: header is not valid JSON: %s (error near header byte %zu)", path,
                        v.error ? v.error : "?", v.at);
    }
    j.at++;
    size_t body = j.at;
    int n = 0;
    size_t ks, vs, ve;
    for (int first = 1;; first = 0) {
        int r = member_next(&j, first, &ks, &vs, &ve);
        if (r < 0)
            return kvh_fail(err, "%s: header is not valid JSON: %s (error near header byte %zu)", path, j.error,
                            j.at);
        if (r == 0) break;
        if (is_metadata_key(htext, (size_t)hlen, ks)) {
            if (metadata_check(j.s + vs, ve - vs) != 0)
                return kvh_fail(err, "%s: \"__metadata__\" (header byte %zu) must be an object mapping strings to "
                                "strings, as the safetensors format defines", path, vs);
        } else {
            if (n == INT32_MAX) return kvh_fail(err, "%s: too many tensors in the header", path);
            n++;
        }
    }
    /* The format pads the header with spaces; anything else after the object is an error. */
    for (size_t p = j.at; p < j.len; p++) {
        char c = htext[p];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r' && c != '\0')
            return kvh_fail(err, "%s: header has trailing bytes after the JSON object (at header byte %zu)", path,
                            p);
    }

    const unsigned char *data = b + 8 + hlen;
    uint64_t data_len = (uint64_t)(len - 8) - hlen;
    kvh_st_tensor *ts = n ? calloc((size_t)n, sizeof *ts) : NULL;
    span *spans = n ? calloc((size_t)n, sizeof *spans) : NULL;
    if (n && (!ts || !spans)) {
        free(ts);
        free(spans);
        return kvh_fail(err, "%s: out of memory for %d tensor entries", path, n);
    }
    st->tensors = ts;
    int rc = 0;
    int i = 0;
    j.at = body;
    for (int first = 1; rc == 0; first = 0) {
        if (member_next(&j, first, &ks, &vs, &ve) != 1) break; /* syntax was checked in pass 1 */
        size_t kraw = vs - ks; /* at least the key's raw text: its decoded form is never longer */
        char *name = malloc(kraw + 1);
        if (!name) {
            rc = kvh_fail(err, "%s: out of memory", path);
            break;
        }
        kvh_json_scan kj = {.s = htext, .len = (size_t)hlen, .at = ks};
        size_t nlen = 0;
        (void)kvh_json_string(&kj, name, &nlen);
        name[nlen] = '\0';
        if (is_metadata_key(htext, (size_t)hlen, ks)) { /* the same test as pass 1 */
            free(name);
            continue;
        }
        ts[i].name = name;
        st->n_tensors = i + 1;
        if (memchr(name, '\0', nlen)) {
            rc = kvh_fail(err, "%s: tensor name at header byte %zu contains a NUL character (\\u0000)", path, ks);
            break;
        }
        if (htext[vs] != '{') {
            rc = kvh_fail(err, "%s: tensor '%s': header entry is not a JSON object", path, name);
            break;
        }
        if (ve - vs > ST_MAX_ENTRY_BYTES) {
            rc = kvh_fail(err, "%s: tensor '%s': header entry is %zu bytes, more than the limit of %d (an entry "
                          "holds dtype, shape and data_offsets)", path, name, ve - vs, ST_MAX_ENTRY_BYTES);
            break;
        }
        cJSON *e = cJSON_ParseWithLength(htext + vs, ve - vs);
        if (!e) { /* the text was validated in pass 1, so only an allocation can have failed */
            rc = kvh_fail(err, "%s: tensor '%s': out of memory parsing its header entry", path, name);
            break;
        }
        rc = parse_entry(e, name, path, data, data_len, &ts[i], &spans[i].begin, &spans[i].end, err);
        cJSON_Delete(e);
        spans[i].idx = i;
        i++;
    }

    if (rc == 0 && n > 1) {
        /* duplicate names: check a sorted table of pointers (not a copy of the tensors) */
        kvh_st_tensor **sorted = malloc((size_t)n * sizeof *sorted);
        if (!sorted) {
            rc = kvh_fail(err, "%s: out of memory", path);
        } else {
            for (int k = 0; k < n; k++) sorted[k] = &ts[k];
            qsort(sorted, (size_t)n, sizeof *sorted, name_cmp);
            for (int k = 1; k < n && rc == 0; k++)
                if (strcmp(sorted[k - 1]->name, sorted[k]->name) == 0)
                    rc = kvh_fail(err, "%s: tensor '%s': name appears more than once in the header", path,
                                  sorted[k]->name);
            free(sorted);
        }
    }
    if (rc == 0 && n > 1) {
        /* overlaps: sort by begin, compare each non-empty tensor with the furthest end seen so far */
        qsort(spans, (size_t)n, sizeof *spans, span_cmp);
        uint64_t max_begin = 0, max_end = 0;
        int max_idx = -1; /* index into ts of the tensor reaching furthest */
        for (int k = 0; k < n; k++) {
            if (spans[k].begin == spans[k].end) continue; /* empty tensors occupy no bytes */
            if (max_idx >= 0 && spans[k].begin < max_end) {
                rc = kvh_fail(err, "%s: tensor '%s': data_offsets [%llu, %llu] overlap tensor '%s' [%llu, "
                              "%llu]", path, ts[spans[k].idx].name, (unsigned long long)spans[k].begin,
                              (unsigned long long)spans[k].end, ts[max_idx].name,
                              (unsigned long long)max_begin, (unsigned long long)max_end);
                break;
            }
            if (spans[k].end > max_end) {
                max_begin = spans[k].begin;
                max_end = spans[k].end;
                max_idx = spans[k].idx;
            }
        }
    }
    free(spans);
    if (rc != 0) {
        kvh_st_close(st);
        snprintf(st->path, sizeof st->path, "%s", path);
        return -1;
    }
    return 0;
}

int kvh_st_open(kvh_safetensors *st, const char *path, kvh_err *err) {
    memset(st, 0, sizeof *st);
    /* non-blocking open + S_ISREG: a FIFO in place of the file is refused instead of hanging */
    int fd = kvh_open_regular(path, err);
    if (fd < 0) return -1;
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int e = errno;
        close(fd);
        return kvh_fail(err, "%s: cannot stat: %s", path, strerror(e));
    }
    if (sb.st_size < 8) {
        close(fd);
        return kvh_fail(err, "%s: file is %lld bytes, too short for the 8-byte safetensors header length "
                        "(truncated or not a safetensors file)", path, (long long)sb.st_size);
    }
    if ((uint64_t)sb.st_size > (uint64_t)SIZE_MAX) {
        close(fd);
        return kvh_fail(err, "%s: file too large to map", path);
    }
    size_t len = (size_t)sb.st_size;
    void *base = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);
    if (base == MAP_FAILED) return kvh_fail(err, "%s: mmap of %zu bytes failed: %s", path, len, strerror(e));
    /* from here on a truncation of the file by someone else is reported by name (mmap_guard.c) */
    (void)kvh_mmap_guard_add(base, len, path);
    if (kvh_st_parse(st, base, len, path, err) != 0) {
        kvh_mmap_guard_remove(base);
        munmap(base, len);
        return -1;
    }
    st->map_base = base;
    st->map_len = len;
    return 0;
}

const kvh_st_tensor *kvh_st_find(const kvh_safetensors *st, const char *name) {
    for (int i = 0; i < st->n_tensors; i++)
        if (strcmp(st->tensors[i].name, name) == 0) return &st->tensors[i];
    return NULL;
}

/* IEEE binary16 -> binary32, exact for every input (subnormals, infinities, NaN payloads). */
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (mant << 13);
    } else {
        float f = (float)mant * 5.9604644775390625e-8f; /* mant * 2^-24, exact */
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

void kvh_st_to_f32(const kvh_st_tensor *t, float *out) {
    const unsigned char *src = t->data;
    size_t n = t->n_elems;
    switch (t->dtype) {
    case KVH_ST_F32:
        memcpy(out, src, n * 4); /* also handles data that is not 4-byte aligned */
        break;
    case KVH_ST_F16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h = (uint16_t)(src[2 * i] | (src[2 * i + 1] << 8));
            out[i] = f16_to_f32(h);
        }
        break;
    case KVH_ST_BF16:
        for (size_t i = 0; i < n; i++) {
            uint32_t bits = ((uint32_t)src[2 * i] | ((uint32_t)src[2 * i + 1] << 8)) << 16;
            memcpy(&out[i], &bits, 4);
        }
        break;
    default:
        assert(!"kvh_st_to_f32: dtype is not F32/F16/BF16; check t->dtype before converting");
        break;
    }
}
