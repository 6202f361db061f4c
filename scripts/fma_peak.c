/* The cores' f32 FMA peak: each thread runs nothing but independent multiply-adds of the
 * widest vectors the compiler targets (AVX-512 where -march=native has it, else AVX2; 12
 * accumulators, more than latency x pipes), so the rate is what the FMA units and the clock
 * they actually run at can do. The ceiling the README's PixelRNN speed figures are read
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

#ifdef __AVX512F__
#define LANES 16
typedef __m512 vec;
#define SET1 _mm512_set1_ps
#define FMADD _mm512_fmadd_ps
static float sum(vec v) { return _mm512_reduce_add_ps(v); }
#else
#define LANES 8
typedef __m256 vec;
#define SET1 _mm256_set1_ps
#define FMADD _mm256_fmadd_ps
static float sum(vec v) {
    float l[8];
    _mm256_storeu_ps(l, v);
    return l[0] + l[1] + l[2] + l[3] + l[4] + l[5] + l[6] + l[7];
}
#endif

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *run(void *out) {
    vec a[ACC];
    const vec b = SET1(0.999999f), c = SET1(1e-7f);
    for (int i = 0; i < ACC; i++) a[i] = SET1((float)i);
    for (long n = 0; n < FMAS / ACC; n++)
        for (int i = 0; i < ACC; i++) a[i] = FMADD(a[i], b, c);
    float s = 0;
    for (int i = 0; i < ACC; i++) s += sum(a[i]);
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
    printf("%d threads: %.1f GFLOP/s of f32 FMA, %d lanes (%.2f s)\n", threads,
           (double)FMAS * threads * LANES * 2 / seconds / 1e9, LANES, seconds);
    return 0;
}
