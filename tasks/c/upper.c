/* Links fopen and uses it on a file it cannot have, then upper-cases standard input. Under the
   sandbox (no preopened directories) and natively (no such file) the fopen fails alike. */
#include <ctype.h>
#include <stdio.h>

int main(void) {
    FILE *f = fopen("/nonexistent/ambient/settings.txt", "r");
    printf("settings: %s\n", f ? "found" : "none");
    int c;
    while ((c = getchar()) != EOF) putchar(toupper(c));
    return f ? 1 : 0;
}
