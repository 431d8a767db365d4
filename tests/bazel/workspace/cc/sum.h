#ifndef CASFS_SAMPLE_SUM_H
#define CASFS_SAMPLE_SUM_H
#ifdef __cplusplus
extern "C" {
#endif
int sum_to(int n);
#ifdef __cplusplus
}
#endif
#endif
