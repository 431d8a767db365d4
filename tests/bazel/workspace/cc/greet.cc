#include "cc/greet.h"

std::string greet(const std::string &who) { return "hello, " + who + "!"; }

unsigned checksum(const std::string &s) {
    unsigned h = 2166136261u;
    for (unsigned char c : s) {
        h ^= c;
        h *= 16777619u;
    }
    return h;
}
