/* test_sampler.c — sampling against its definitions: greedy is argmax (lowest id on ties), top-k and
 * top-p never leave their candidate sets, temperature-1 sampling follows softmax(logits) (checked
 * empirically against probabilities computed here), and a seed fixes the sequence. */
#define _GNU_SOURCE /* qsort_r, for the whole-vocabulary reference sort */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "helpers/test_util.h"
#include "model/sampler.h"

static kvh_sampler make(float temperature, int top_k, float top_p, uint64_t seed, int V) {
    kvh_sampler s;
    kvh_sampler_params p = {.temperature = temperature, .top_k = top_k, .top_p = top_p, .seed = seed};
    kvh_err err = {{0}};
    cr_assert_eq(kvh_sampler_init(&s, &p, V, 0, &err), 0, "%s", err.msg);
    return s;
}

Test(sampler, greedy_is_argmax_lowest_id_on_ties) {
    float logits[6] = {0.5f, 2.0f, -1.0f, 2.0f, 1.9f, 0.0f};
    kvh_sampler s = make(0.0f, 0, 1.0f, 1, 6);
    cr_assert_eq(kvh_sampler_next(&s, logits), 1);
    kvh_sampler_free(&s);
}

Test(sampler, temperature_one_follows_softmax) {
    float logits[4] = {1.0f, 0.0f, -1.0f, 2.0f};
    double z = 0, p[4];
    for (int i = 0; i < 4; i++) z += exp(logits[i]);
    for (int i = 0; i < 4; i++) p[i] = exp(logits[i]) / z;
    kvh_sampler s = make(1.0f, 0, 1.0f, 42, 4);
    int counts[4] = {0};
    const int N = 40000;
    for (int i = 0; i < N; i++) counts[kvh_sampler_next(&s, logits)]++;
    for (int i = 0; i < 4; i++) {
        double f = (double)counts[i] / N;
        double sd = sqrt(p[i] * (1 - p[i]) / N);
        cr_expect(fabs(f - p[i]) < 5 * sd, "token %d: frequency %.4f, softmax %.4f", i, f, p[i]);
    }
    kvh_sampler_free(&s);
}

Test(sampler, top_k_and_top_p_stay_in_their_sets) {
    float logits[8] = {3.0f, 2.9f, 0.1f, 0.0f, -1.0f, 2.8f, -2.0f, 0.2f};
    kvh_sampler k2 = make(5.0f, 2, 1.0f, 7, 8); /* hot temperature: without top-k anything could come out */
    kvh_sampler p1 = make(1.0f, 0, 0.3f, 7, 8); /* token 0 alone has probability >= 0.3 */
    for (int i = 0; i < 2000; i++) {
        int a = kvh_sampler_next(&k2, logits);
        cr_assert(a == 0 || a == 1, "top-k 2 sampled %d", a);
        cr_assert_eq(kvh_sampler_next(&p1, logits), 0);
    }
    kvh_sampler_free(&k2);
    kvh_sampler_free(&p1);
}

Test(sampler, seed_fixes_the_sequence) {
    float logits[16];
    for (int i = 0; i < 16; i++) logits[i] = (float)((i * 7) % 5) * 0.3f;
    kvh_sampler a = make(1.0f, 0, 0.95f, 123, 16), b = make(1.0f, 0, 0.95f, 123, 16), c = make(1.0f, 0, 0.95f, 124, 16);
    int same_ab = 1, same_ac = 1;
    for (int i = 0; i < 200; i++) {
        int x = kvh_sampler_next(&a, logits), y = kvh_sampler_next(&b, logits), z = kvh_sampler_next(&c, logits);
        same_ab &= x == y;
        same_ac &= x == z;
    }
    cr_assert(same_ab, "same seed gave different sequences");
    cr_assert(!same_ac, "different seeds gave the same 200 samples");
    kvh_sampler_free(&a);
    kvh_sampler_free(&b);
    kvh_sampler_free(&c);
}

Test(sampler, bad_parameters_are_errors) {
    kvh_sampler s;
    kvh_err err = {{0}};
    kvh_sampler_params p = kvh_sampler_default_params();
    p.temperature = -1.0f;
    cr_assert_eq(kvh_sampler_init(&s, &p, 10, 0, &err), -1);
    cr_assert(strstr(err.msg, "--temperature"), "%s", err.msg);
    p = kvh_sampler_default_params();
    p.top_p = 0.0f;
    cr_assert_eq(kvh_sampler_init(&s, &p, 10, 0, &err), -1);
    cr_assert(strstr(err.msg, "--top-p"), "%s", err.msg);
    p = kvh_sampler_default_params();
    p.top_k = -3;
    cr_assert_eq(kvh_sampler_init(&s, &p, 10, 0, &err), -1);
    cr_assert(strstr(err.msg, "--top-k"), "%s", err.msg);
}

/* ---- issue 20: top-k then top-p as transformers composes them -------------------------------------- */

/* The reference distribution, from the definition and in double precision, independent of sampler.c:
 * p = softmax(logits / T); keep the k most likely (ties at the k-th value kept); renormalize; keep the
 * most likely tokens while the renormalized mass before each is < top_p; renormalize again. */
static int reference(const float *logits, int V, double T, int top_k, double top_p, double *q) {
    double mx = -INFINITY, z = 0;
    for (int i = 0; i < V; i++) mx = fmax(mx, logits[i] / T);
    for (int i = 0; i < V; i++) z += q[i] = exp(logits[i] / T - mx);
    for (int i = 0; i < V; i++) q[i] /= z;
    int rank[64];
    for (int i = 0; i < V; i++) { /* rank by selection: the simplest correct sort */
        int r = 0;
        for (int j = 0; j < V; j++) r += q[j] > q[i] || (q[j] == q[i] && j < i);
        rank[r] = i;
    }
    int keep = V;
    if (top_k > 0 && top_k < V) {
        keep = top_k;
        while (keep < V && q[rank[keep]] == q[rank[keep - 1]]) keep++;
    }
    double mass = 0;
    for (int r = 0; r < keep; r++) mass += q[rank[r]];
    double before = 0;
    int kept_p = 0;
    for (int r = 0; r < keep; r++) {
        if (before / mass >= top_p) break;
        before += q[rank[r]];
        kept_p++;
    }
    double m2 = 0;
    for (int r = 0; r < kept_p; r++) m2 += q[rank[r]];
    double out[64] = {0};
    for (int r = 0; r < kept_p; r++) out[rank[r]] = q[rank[r]] / m2;
    memcpy(q, out, (size_t)V * sizeof *q);
    return kept_p;
}

/* Chi-square of N draws against q (support only; a draw outside it fails at once); the bound is the
 * 0.999 quantile by Wilson-Hilferty, so a correct sampler fails with probability 1e-3 for a given seed
 * (and the seeds are fixed, so the test is deterministic). */
static void check_distribution(const float *logits, int V, float T, int top_k, float top_p, int expect_support) {
    double q[64];
    int support = reference(logits, V, T, top_k, top_p, q);
    if (expect_support) cr_assert_eq(support, expect_support, "reference keeps %d tokens", support);
    kvh_sampler s = make(T, top_k, top_p, 2026 + (uint64_t)top_k, V);
    const int N = 50000;
    long counts[64] = {0};
    for (int i = 0; i < N; i++) {
        int t = kvh_sampler_next(&s, logits);
        cr_assert(q[t] > 0, "T=%g top_k=%d top_p=%g: sampled token %d, outside the reference support", (double)T,
                  top_k, (double)top_p, t);
        counts[t]++;
    }
    kvh_sampler_free(&s);
    double chi2 = 0, tv = 0;
    for (int i = 0; i < V; i++) {
        if (q[i] <= 0) continue;
        double e = q[i] * N;
        chi2 += (counts[i] - e) * (counts[i] - e) / e;
        tv += fabs((double)counts[i] / N - q[i]) / 2;
    }
    int df = support - 1;
    if (df == 0) return; /* one token: every draw was checked to be it above */
    double a = 2.0 / (9.0 * df), crit = df * pow(1 - a + 3.090 * sqrt(a), 3);
    cr_assert(chi2 < crit, "T=%g top_k=%d top_p=%g: chi-square %.1f >= %.1f (df %d), TV %.4f", (double)T, top_k,
              (double)top_p, chi2, crit, df, tv);
    cr_assert(tv < 0.02, "T=%g top_k=%d top_p=%g: total variation %.4f", (double)T, top_k, (double)top_p, tv);
}

/* The case: top_k=10, top_p=0.5 with a heavy tail. Accumulated over the full vocabulary (the
 * old sampler) 6 tokens are needed to reach 0.5; renormalized over the top 10 (transformers) 4. */
Test(sampler, top_k_then_top_p_on_the_renormalized_set) {
    float logits[20];
    for (int i = 0; i < 20; i++) logits[i] = 1.0f - 0.12f * (float)i; /* a flat tail holds much of the mass */
    double q[64];
    cr_assert_eq(reference(logits, 20, 1.0, 10, 0.5, q), 4, "renormalized: 4 tokens reach 0.5");
    cr_assert_eq(reference(logits, 20, 1.0, 0, 0.5, q), 6, "full vocabulary: 6 tokens reach 0.5");
    check_distribution(logits, 20, 1.0f, 10, 0.5f, 4);
    check_distribution(logits, 20, 1.0f, 0, 0.5f, 6);
}

Test(sampler, distributions_match_the_definition) {
    float logits[32];
    for (int i = 0; i < 32; i++) logits[i] = (float)sin(i * 1.7) * 2.0f + (i % 5 == 0 ? 1.0f : 0.0f);
    const float temps[] = {0.7f, 1.0f, 1.6f};
    const int ks[] = {0, 1, 3, 10, 32};
    const float ps[] = {1.0f, 0.9f, 0.5f, 0.2f};
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 5; b++)
            for (int c = 0; c < 4; c++) check_distribution(logits, 32, temps[a], ks[b], ps[c], 0);
}

/* Ties at the k-th value stay in the set, as with transformers' `logits < kth_value` threshold. */
Test(sampler, top_k_keeps_ties_at_the_boundary) {
    float logits[6] = {2.0f, 1.0f, 1.0f, 1.0f, -1.0f, -2.0f};
    double q[64];
    cr_assert_eq(reference(logits, 6, 1.0, 2, 1.0, q), 4);
    check_distribution(logits, 6, 1.0f, 2, 1.0f, 4);
}

/* ---- the candidate pre-selection at vocabulary size ----------------------------------------------- */

static int cmp_desc(const void *a, const void *b, void *ctx) {
    const float *p = ctx;
    const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    if (p[x] != p[y]) return p[x] > p[y] ? -1 : 1;
    return (x > y) - (x < y);
}

/* The draw as the definition makes it with a whole-vocabulary sort (what sampler.c did before it
 * pre-selected candidates): the same float probabilities, the same uniform number u in [0, 1). */
static int32_t full_sort_draw(const float *probs, int V, int top_k, float top_p, float u) {
    int32_t *order = malloc((size_t)V * sizeof *order);
    cr_assert_not_null(order);
    for (int i = 0; i < V; i++) order[i] = i;
    qsort_r(order, (size_t)V, sizeof *order, cmp_desc, (void *)probs);
    int keep = V;
    if (top_k > 0 && top_k < V) {
        keep = top_k;
        while (keep < V && probs[order[keep]] == probs[order[keep - 1]]) keep++;
    }
    if (top_p < 1.0f) {
        double mass = 0, cum = 0;
        for (int i = 0; i < keep; i++) mass += probs[order[i]];
        for (int i = 0; i < keep; i++) {
            cum += probs[order[i]];
            if (cum >= (double)top_p * mass) {
                keep = i + 1;
                break;
            }
        }
    }
    double kept = 0, acc = 0;
    for (int i = 0; i < keep; i++) kept += probs[order[i]];
    const float x = u * (float)kept;
    int32_t tok = order[keep - 1];
    for (int i = 0; i < keep; i++) {
        acc += probs[order[i]];
        if (x < acc) {
            tok = order[i];
            break;
        }
    }
    free(order);
    return tok;
}

/* sampler.h's generator (xorshift64*, top 24 bits), stepped here from a copy of the sampler's state so
 * the reference draws with the same u. */
static float next_uniform(uint64_t *st) {
    *st ^= *st >> 12;
    *st ^= *st << 25;
    *st ^= *st >> 27;
    return (float)(((*st * 0x2545F4914F6CDD1Dull) >> 40) * (1.0 / 16777216.0));
}

/* GPT-2's vocabulary size, logits like a model's (a few strong candidates over a long tail) and, in every
 * other row, logits rounded to steps of 0.25 so many tokens tie, including at the k-th place: every draw
 * must be the token the whole-vocabulary definition gives. */
Test(sampler, candidate_preselection_draws_what_a_full_sort_draws) {
    const int V = 50257;
    float *logits = malloc((size_t)V * sizeof *logits), *probs = malloc((size_t)V * sizeof *probs);
    cr_assert(logits && probs);
    const float temps[] = {0.5f, 0.8f, 1.5f};
    const int ks[] = {0, 1, 5, 40, 1000};
    const float ps[] = {1.0f, 0.95f, 0.5f, 0.1f};
    uint64_t seed = 0x853c49e6748fea9bull;
    int draws = 0;
    for (int row = 0; row < 4; row++) {
        for (int i = 0; i < V; i++) {
            const double g = (double)(kvh_test_xorshift(&seed) >> 11) / 9007199254740992.0;
            logits[i] = (float)(4.0 * g * g * g - 2.0) + (i % 997 == 0 ? 6.0f : 0.0f);
            if (row % 2) logits[i] = roundf(logits[i] * 4.0f) / 4.0f;
        }
        for (size_t a = 0; a < sizeof temps / sizeof *temps; a++)
            for (size_t b = 0; b < sizeof ks / sizeof *ks; b++)
                for (size_t c = 0; c < sizeof ps / sizeof *ps; c++) {
                    if (ks[b] == 0 && ps[c] == 1.0f) continue; /* untruncated: no candidates */
                    kvh_sampler s = make(temps[a], ks[b], ps[c], 1000 + (uint64_t)row, V);
                    for (int t = 0; t < 3; t++) {
                        uint64_t st = s.rng;
                        const int32_t got = kvh_sampler_next(&s, logits);
                        memcpy(probs, s.probs, (size_t)V * sizeof *probs); /* the probabilities it drew from */
                        const int32_t want = full_sort_draw(probs, V, ks[b], ps[c], next_uniform(&st));
                        cr_assert_eq(got, want, "row %d T=%g top_k=%d top_p=%g draw %d: %d, full sort %d", row,
                                     (double)temps[a], ks[b], (double)ps[c], t, got, want);
                        draws++;
                    }
                    kvh_sampler_free(&s);
                }
    }
    cr_log_info("%d draws at V = %d matched the whole-vocabulary sort", draws, V);
    free(logits);
    free(probs);
}
