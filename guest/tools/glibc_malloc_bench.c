/* Host baseline for the guest's CPL3 small-allocation benchmark: glibc
 * malloc(64)+free timed exactly like the guest does (one op per sample,
 * lfence;rdtsc;lfence around it, the median of an empty pair subtracted),
 * with a free list prepared like the guest's: L-1 unmergeable 32-byte holes.
 * Usage: glibc_malloc_bench [L] [n]; prints "p50 p99 min max overhead". */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static inline uint64_t tsc(void) {
    uint32_t lo, hi;
    __asm__ volatile("lfence; rdtsc; lfence" : "=a"(lo), "=d"(hi)::"memory");
    return ((uint64_t)hi << 32) | lo;
}

static int cmp(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    int len = argc > 1 ? atoi(argv[1]) : 64, n = argc > 2 ? atoi(argv[2]) : 500;
    void **a = calloc(len, sizeof *a), **b = calloc(len, sizeof *b);
    uint64_t *s = calloc(n, sizeof *s);
    for (int i = 0; i < len - 1; i++) { a[i] = malloc(32); b[i] = malloc(32); }
    for (int i = len - 2; i >= 0; i--) free(a[i]);
    for (int i = 0; i < n; i++) { uint64_t t0 = tsc(); __asm__ volatile("" ::: "memory"); s[i] = tsc() - t0; }
    qsort(s, n, sizeof *s, cmp);
    uint64_t overhead = s[n / 2];
    for (int i = 0; i < n; i++) {
        uint64_t t0 = tsc();
        void *volatile p = malloc(64);
        free(p);
        uint64_t t1 = tsc() - t0;
        s[i] = t1 > overhead ? t1 - overhead : 0;
    }
    qsort(s, n, sizeof *s, cmp);
    printf("%llu %llu %llu %llu %llu\n", (unsigned long long)s[n / 2], (unsigned long long)s[n * 99 / 100],
           (unsigned long long)s[0], (unsigned long long)s[n - 1], (unsigned long long)overhead);
    return 0;
}
