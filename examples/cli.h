/* cli.h - what the two files of the afm command line share: afm.c (generate, tokenize, info) defines
   these, afm_bench.c (afm bench) uses them. Every function that ends in _or_die prints a message and
   exits with status 1. */
#ifndef AFM_CLI_H
#define AFM_CLI_H

void die(const char *fmt, const char *arg);
long parse_int(const char *s, const char *opt, long lo, long hi);
float parse_float(const char *s, const char *opt);
double now_seconds(void);
afm_model *load_or_die(const char *path, int no_mmap);
afm_adapter *load_adapter_or_die(afm_model *m, const char *path);
afm_kernels kernels_or_die(const char *name); /* --kernels NAME: a level this CPU has */

int cmd_bench(int argc, char **argv); /* afm_bench.c */

#endif
