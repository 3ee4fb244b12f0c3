/* sampler.c — implementation of sampler.h. Temperature, then top-k, then top-p over the renormalized
 * top-k set: the order transformers' generate() composes its warpers in. */
#include "model/sampler.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

kvh_sampler_params kvh_sampler_default_params(void) {
    kvh_sampler_params p = {.temperature = 0.0f, .top_k = 0, .top_p = 1.0f, .seed = 1234};
    return p;
}

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static float rng_uniform(kvh_sampler *s) {
    s->rng ^= s->rng >> 12;
    s->rng ^= s->rng << 25;
    s->rng ^= s->rng >> 27;
    uint64_t r = s->rng * 0x2545F4914F6CDD1Dull;
    return (float)((r >> 40) * (1.0 / 16777216.0)); /* [0, 1) with 24 bits */
}

int kvh_sampler_init(kvh_sampler *s, const kvh_sampler_params *p, int n_vocab, uint64_t stream, kvh_err *err) {
    memset(s, 0, sizeof *s);
    if (!(p->temperature >= 0.0f) || !isfinite(p->temperature))
        return kvh_fail(err, "--temperature %g: must be a finite number >= 0 (0 = greedy)", (double)p->temperature);
    if (p->top_k < 0) return kvh_fail(err, "--top-k %d: must be >= 0 (0 = off)", p->top_k);
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f)) return kvh_fail(err, "--top-p %g: must be in (0, 1]", (double)p->top_p);
    s->p = *p;
    s->n_vocab = n_vocab;
    uint64_t x = p->seed ^ (stream * 0xD1B54A32D192ED03ull);
    s->rng = splitmix64(&x) | 1u;
    s->probs = malloc((size_t)n_vocab * sizeof(float));
    s->order = malloc((size_t)n_vocab * sizeof(int32_t));
    if (!s->probs || !s->order) {
        kvh_sampler_free(s);
        return kvh_fail(err, "sampler: out of memory");
    }
    return 0;
}

void kvh_sampler_free(kvh_sampler *s) {
    free(s->probs);
    free(s->order);
    s->probs = NULL;
    s->order = NULL;
}

int32_t kvh_argmax(const float *logits, int n) {
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (logits[i] > logits[best]) best = i;
    return best;
}

/* Order of candidates: higher probability first, lower id first on ties. */
static int before(const float *p, int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); }

static void sift_down(int32_t *h, int n, int i, const float *p) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        /* a min-heap in `before` order: the root is the candidate that sorts last */
        if (l < n && before(p, h[m], h[l])) m = l;
        if (r < n && before(p, h[m], h[r])) m = r;
        if (m == i) return;
        int32_t t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

/* Makes h[0..n-1] a heap whose root is the candidate that sorts last. */
static void heapify(int32_t *h, int n, const float *p) {
    for (int i = n / 2 - 1; i >= 0; i--) sift_down(h, n, i, p);
}

/* Heapsort of order[0..n-1] by probability, descending (qsort has no context argument, and a global
 * would make samplers share state). */
static void sort_by_prob(int32_t *order, int n, const float *p) {
    heapify(order, n, p);
    for (int end = n - 1; end > 0; end--) {
        int32_t t = order[0];
        order[0] = order[end];
        order[end] = t;
        sift_down(order, end, 0, p);
    }
}

/* The candidates a truncated draw can pick, in `before` order, into s->order; returns how many.
 * Sorting the whole vocabulary for every token (50,257 entries, ~20 ms) dominated a served batch's step,
 * so only a superset of the kept tokens is sorted, chosen so that the kept set comes out the same:
 * - top-k: the k best through a k-entry heap, then every token tied with the k-th (kept, as ties at the
 *   boundary are);
 * - top-p alone: every token with probability >= t = (1 - top_p) mass / (2V). The tokens below t weigh
 *   less than V t < (1 - top_p) mass together, so the ones above weigh more than top_p mass: the
 *   smallest prefix reaching it lies among them (the factor 2 is a margin for rounding). */
static int sorted_candidates(kvh_sampler *s, double mass_all) {
    const int V = s->n_vocab;
    const float *p = s->probs;
    int32_t *order = s->order;
    float floor_p;
    if (s->p.top_k > 0 && s->p.top_k < V) {
        const int k = s->p.top_k;
        for (int i = 0; i < k; i++) order[i] = i;
        heapify(order, k, p); /* root: the k-th best so far */
        for (int i = k; i < V; i++)
            if (before(p, i, order[0])) {
                order[0] = i;
                sift_down(order, k, 0, p);
            }
        floor_p = p[order[0]]; /* the k-th best */
    } else if (s->p.top_p < 1.0f) {
        floor_p = (float)((1.0 - (double)s->p.top_p) * mass_all / (2.0 * V));
    } else {
        floor_p = 0.0f;
    }
    int n = 0;
    for (int i = 0; i < V; i++)
        if (p[i] >= floor_p) order[n++] = i;
    sort_by_prob(order, n, p);
    return n;
}

int32_t kvh_sampler_next(kvh_sampler *s, const float *logits) {
    const int V = s->n_vocab;
    if (s->p.temperature == 0.0f) return kvh_argmax(logits, V);
    float mx = logits[kvh_argmax(logits, V)];
    float inv_t = 1.0f / s->p.temperature;
    double sum = 0.0;
    for (int i = 0; i < V; i++) {
        s->probs[i] = expf((logits[i] - mx) * inv_t);
        sum += s->probs[i];
    }
    double mass_all = 0.0;
    for (int i = 0; i < V; i++) {
        s->probs[i] = (float)(s->probs[i] / sum);
        mass_all += s->probs[i];
    }
    if (s->p.top_k > 0 || s->p.top_p < 1.0f) {
        /* transformers' order (TopKLogitsWarper then TopPLogitsWarper): top-k keeps every token whose
         * probability is at least the k-th largest (ties at the boundary stay, as with its threshold
         * compare), then top-p runs on the probabilities renormalized over that set: a token stays while
         * the mass of the tokens before it is below top_p (the smallest prefix reaching top_p). */
        int n_keep = sorted_candidates(s, mass_all);
        const bool top_k_on = s->p.top_k > 0 && s->p.top_k < V;
        if (s->p.top_p < 1.0f) {
            double mass = mass_all; /* without top-k the renormalizing set is the whole vocabulary */
            if (top_k_on) {
                mass = 0.0;
                for (int i = 0; i < n_keep; i++) mass += s->probs[s->order[i]];
            }
            double cum = 0.0;
            for (int i = 0; i < n_keep; i++) {
                cum += s->probs[s->order[i]];
                if (cum >= (double)s->p.top_p * mass) {
                    n_keep = i + 1;
                    break;
                }
            }
        }
        double kept = 0.0;
        for (int i = 0; i < n_keep; i++) kept += s->probs[s->order[i]];
        float u = rng_uniform(s) * (float)kept;
        double acc = 0.0;
        for (int i = 0; i < n_keep; i++) {
            acc += s->probs[s->order[i]];
            if (u < acc) return s->order[i];
        }
        return s->order[n_keep - 1];
    }
    float u = rng_uniform(s);
    double acc = 0.0;
    for (int i = 0; i < V; i++) {
        acc += s->probs[i];
        if (u < acc) return i;
    }
    return kvh_argmax(logits, V);
}
