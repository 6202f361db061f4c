/* The cores' f32 FMA peak: each thread runs nothing but independent AVX-512 multiply-adds
 * (12 accumulators, more than latency x pipes), so the rate is what the FMA units and the
 * clock they actually run at can do. The ceiling the README's PixelRNN speed figures are read
 * against; not part of the build or the tests.
 *
 *     gcc -O3 -march=native -pthread scripts/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak 2
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define FMAS 2400000000L /* per thread, 12 at a time */
#define ACC 12

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *run(void *out) {
    __m512 a[ACC];
    const __m512 b = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
    for (int i = 0; i < ACC; i++) a[i] = _mm512_set1_ps((float)i);
    for (long n = 0; n < FMAS / ACC; n++)
        for (int i = 0; i < ACC; i++) a[i] = _mm512_fmadd_ps(a[i], b, c);
    float s = 0;
    for (int i = 0; i < ACC; i++) s += _mm512_reduce_add_ps(a[i]);
    *(float *)out = s; /* so the loop is not optimized away */
    return NULL;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    if (threads < 1 || threads > 64) {
        fprintf(stderr, "usage: %s [threads, 1 to 64]\n", argv[0]);
        return 64;
    }
    pthread_t th[64];
    float out[64];
    double start = now();
    for (int i = 0; i < threads; i++) pthread_create(&th[i], NULL, run, &out[i]);
    for (int i = 0; i < threads; i++) pthread_join(th[i], NULL);
    double seconds = now() - start;
    printf("%d threads: %.1f GFLOP/s of f32 FMA (%.2f s)\n", threads,
           (double)FMAS * threads * 16 * 2 / seconds / 1e9, seconds);
    return 0;
}
