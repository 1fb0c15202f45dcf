/* replay.h - the main() of a fuzz harness built with -DAFM_FUZZ_MAIN instead of libFuzzer: runs
   LLVMFuzzerTestOneInput on each file named on the command line (tests/run.sh replays the corpora
   this way). Included at the end of a harness; needs <stdio.h> and <stdlib.h>. */
#ifdef AFM_FUZZ_MAIN
int main(int argc, char **argv) {
    int i;
    for (i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        unsigned char *buf;
        long n;
        if (!f) { fprintf(stderr, "cannot open %s\n", argv[i]); return 1; }
        fseek(f, 0, SEEK_END);
        n = ftell(f);
        rewind(f);
        buf = (unsigned char *)malloc((size_t)n + 1);
        if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) { fprintf(stderr, "cannot read %s\n", argv[i]); return 1; }
        fclose(f);
        LLVMFuzzerTestOneInput(buf, (size_t)n);
        free(buf);
    }
    printf("replayed %d inputs\n", argc - 1);
    return 0;
}
#endif
