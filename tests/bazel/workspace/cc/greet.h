#ifndef CASFS_SAMPLE_GREET_H
#define CASFS_SAMPLE_GREET_H

#include <string>

std::string greet(const std::string &who);
unsigned checksum(const std::string &s);

#endif
