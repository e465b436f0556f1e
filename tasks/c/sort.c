/* Whitespace-separated integers from standard input, sorted, with their sum: malloc, realloc,
   qsort and scanf from wasi-libc. */
#include <stdio.h>
#include <stdlib.h>

static int compare(const void *a, const void *b) {
    long x = *(const long *)a, y = *(const long *)b;
    return (x > y) - (x < y);
}

int main(void) {
    size_t len = 0, cap = 16;
    long *v = malloc(cap * sizeof *v), x, sum = 0;
    while (v && scanf("%ld", &x) == 1) {
        if (len == cap && !(v = realloc(v, (cap *= 2) * sizeof *v))) break;
        v[len++] = x;
        sum += x;
    }
    if (!v) return 1;
    qsort(v, len, sizeof *v, compare);
    for (size_t i = 0; i < len; i++) printf("%ld\n", v[i]);
    printf("sum %ld\n", sum);
    free(v);
    return 0;
}
