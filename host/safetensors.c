/* safetensors.c — reading and validating the safetensors container (see safetensors.h for the format).
 * Owns: mmap of the file, header JSON validation (dtype, shape, data_offsets, sizes, overlaps, duplicate
 * names), tensor lookup, F32/F16/BF16 -> fp32 conversion. Does not own: what tensors mean or which
 * dtypes a caller accepts (model.c decides; KVH_ST_OTHER marks valid dtypes the host cannot use).
 * Every error names the file and, where one is involved, the tensor. */
#define _POSIX_C_SOURCE 200809L
#include "safetensors.h"

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
static int parse_entry(const cJSON *e, const char *path, const unsigned char *data, uint64_t data_len,
                       kvh_st_tensor *t, uint64_t *begin_out, uint64_t *end_out, kvh_err *err) {
    const char *name = e->string;
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
    const kvh_st_tensor *x = a, *y = b;
    return strcmp(x->name, y->name);
}

void kvh_st_close(kvh_safetensors *st) {
    if (!st) return;
    if (st->tensors) {
        for (int i = 0; i < st->n_tensors; i++) free(st->tensors[i].name);
        free(st->tensors);
    }
    if (st->map_base) munmap(st->map_base, st->map_len);
    memset(st, 0, sizeof *st);
}

int kvh_st_parse(kvh_safetensors *st, const void *buf, size_t len, const char *path, kvh_err *err) {
    memset(st, 0, sizeof *st);
    snprintf(st->path, sizeof st->path, "%s", path);
    const unsigned char *b = buf;
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

    const char *htext = (const char *)b + 8;
    const char *end_ptr = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(htext, (size_t)hlen, &end_ptr, 0);
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        long off = (at && at >= htext && at <= htext + hlen) ? (long)(at - htext) : -1;
        return kvh_fail(err, "%s: header is not valid JSON (error near header byte %ld)", path, off);
    }
    /* The format pads the header with spaces; anything else after the object is an error. */
    for (const char *p = end_ptr; p && p < htext + hlen; p++) {
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r' && *p != '\0') {
            cJSON_Delete(root);
            return kvh_fail(err, "%s: header has trailing bytes after the JSON object (at header byte %ld)",
                            path, (long)(p - htext));
        }
    }
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return kvh_fail(err, "%s: header is not a JSON object", path);
    }

    const unsigned char *data = b + 8 + hlen;
    uint64_t data_len = (uint64_t)(len - 8) - hlen;
    int n = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, root) {
        if (strcmp(e->string, "__metadata__") != 0) n++;
    }
    kvh_st_tensor *ts = n ? calloc((size_t)n, sizeof *ts) : NULL;
    span *spans = n ? calloc((size_t)n, sizeof *spans) : NULL;
    if (n && (!ts || !spans)) {
        free(ts);
        free(spans);
        cJSON_Delete(root);
        return kvh_fail(err, "%s: out of memory for %d tensor entries", path, n);
    }
    st->tensors = ts;
    int rc = 0;
    int i = 0;
    cJSON_ArrayForEach(e, root) {
        if (strcmp(e->string, "__metadata__") == 0) continue; /* free-form; ignored */
        ts[i].name = strdup(e->string);
        if (!ts[i].name) {
            rc = kvh_fail(err, "%s: out of memory", path);
            break;
        }
        st->n_tensors = i + 1;
        if (parse_entry(e, path, data, data_len, &ts[i], &spans[i].begin, &spans[i].end, err) != 0) {
            rc = -1;
            break;
        }
        spans[i].idx = i;
        i++;
    }

    if (rc == 0 && n > 1) {
        /* duplicate names: cJSON keeps both entries of a repeated key, so check a sorted copy */
        kvh_st_tensor *sorted = malloc((size_t)n * sizeof *sorted);
        if (!sorted) {
            rc = kvh_fail(err, "%s: out of memory", path);
        } else {
            memcpy(sorted, ts, (size_t)n * sizeof *sorted);
            qsort(sorted, (size_t)n, sizeof *sorted, name_cmp);
            for (int k = 1; k < n && rc == 0; k++)
                if (strcmp(sorted[k - 1].name, sorted[k].name) == 0)
                    rc = kvh_fail(err, "%s: tensor '%s': name appears more than once in the header", path,
                                  sorted[k].name);
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
    cJSON_Delete(root);
    if (rc != 0) {
        kvh_st_close(st);
        snprintf(st->path, sizeof st->path, "%s", path);
        return -1;
    }
    return 0;
}

int kvh_st_open(kvh_safetensors *st, const char *path, kvh_err *err) {
    memset(st, 0, sizeof *st);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return kvh_fail(err, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int e = errno;
        close(fd);
        return kvh_fail(err, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return kvh_fail(err, "%s: not a regular file", path);
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
    if (kvh_st_parse(st, base, len, path, err) != 0) {
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
