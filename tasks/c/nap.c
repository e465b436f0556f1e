/* Sleeps between two lines: poll_oneoff with a clock subscription, answered at once in the
   sandbox, whose clock never moves. */
#include <stdio.h>
#include <unistd.h>

int main(void) {
    puts("before");
    fflush(stdout);
    usleep(1000);
    puts("after");
    return 0;
}
