/* sampler.h — choosing the next token from logits: greedy, temperature, top-k, top-p, seeded.
 * Owns: the sampling parameters, the per-sequence random state, the scratch for sorting candidates.
 * Does not own: logits computation or the decode loop. */
#ifndef KVH_SAMPLER_H
#define KVH_SAMPLER_H

#include <stdint.h>

#include "util/util.h"

typedef struct kvh_sampler_params {
    float temperature; /* 0 = greedy (argmax, lowest id on ties) */
    int top_k;         /* 0 = off */
    float top_p;       /* 1 = off; keep the smallest set whose probability, renormalized over the top-k
                        * set when top_k is on, reaches top_p (transformers' TopK then TopP warpers) */
    uint64_t seed;
} kvh_sampler_params;

typedef struct kvh_sampler {
    kvh_sampler_params p;
    int n_vocab;
    uint64_t rng;       /* xorshift64* state */
    float *probs;       /* [V] scratch */
    int32_t *order;     /* [V] scratch */
} kvh_sampler;

kvh_sampler_params kvh_sampler_default_params(void);
/* Validates the parameters (temperature >= 0, top_k >= 0, 0 < top_p <= 1). */
int kvh_sampler_init(kvh_sampler *s, const kvh_sampler_params *p, int n_vocab, uint64_t stream, kvh_err *err);
void kvh_sampler_free(kvh_sampler *s);
/* Index of the largest logit (lowest index on ties). */
int32_t kvh_argmax(const float *logits, int n);
int32_t kvh_sampler_next(kvh_sampler *s, const float *logits);

#endif
