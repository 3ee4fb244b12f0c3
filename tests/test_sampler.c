/* test_sampler.c — sampling against its definitions: greedy is argmax (lowest id on ties), top-k and
 * top-p never leave their candidate sets, temperature-1 sampling follows softmax(logits) (checked
 * empirically against probabilities computed here), and a seed fixes the sequence. */
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "sampler.h"

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
