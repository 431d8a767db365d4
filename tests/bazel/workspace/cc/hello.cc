#include <cstdio>
#include <string>

#include "cc/greet.h"
#include "cc/sum.h"

int main(int argc, char **argv) {
    std::string who = argc > 1 ? argv[1] : "casfs";
    std::string msg = greet(who);
    std::printf("%s\nchecksum %08x\nsum_to(100) %d\n", msg.c_str(), checksum(msg), sum_to(100));
    return 0;
}
