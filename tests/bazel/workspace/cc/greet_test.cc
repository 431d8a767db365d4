#include <cstdio>

#include "cc/greet.h"
#include "cc/sum.h"

int main() {
    int failures = 0;
    if (greet("bazel") != "hello, bazel!") { std::puts("greet failed"); failures++; }
    if (sum_to(10) != 55) { std::puts("sum_to failed"); failures++; }
    if (checksum("") != 2166136261u) { std::puts("checksum failed"); failures++; }
    std::printf("%d failures\n", failures);
    return failures == 0 ? 0 : 1;
}
