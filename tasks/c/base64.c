/* Standard input as base64 (RFC 4648), 76 characters a line like base64(1). */
#include <stdio.h>

static const char ALPHABET[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

int main(void) {
    unsigned char in[3];
    size_t n;
    int column = 0;
    while ((n = fread(in, 1, 3, stdin)) > 0) {
        unsigned v = in[0] << 16 | (n > 1 ? in[1] << 8 : 0) | (n > 2 ? in[2] : 0);
        char out[4] = {ALPHABET[v >> 18 & 63], ALPHABET[v >> 12 & 63],
                       n > 1 ? ALPHABET[v >> 6 & 63] : '=', n > 2 ? ALPHABET[v & 63] : '='};
        for (int i = 0; i < 4; i++) {
            putchar(out[i]);
            if (++column == 76) {
                putchar('\n');
                column = 0;
            }
        }
        if (n < 3) break;
    }
    if (column) putchar('\n');
    return 0;
}
