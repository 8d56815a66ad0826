/* The C ABI end to end: open an engine, embed texts of every task, token ids and an image (by
 * path and by bytes), a few bad requests (each must fail alone), the caller-buffer variant, and
 * the handle rules (a freed handle is an error, freeing twice is harmless).
 *
 *   cc -I include examples/embed.c -L target/release -ljv4 -lm -o embed
 *   LD_LIBRARY_PATH=target/release ./embed MODEL_DIR tests/fixtures/images/grad_224x224.png
 *
 * tests/capi.rs builds and runs it against a synthetic model. Exits 0 when every check passed. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jv4.h"

static int checks = 0, failures = 0;

#define CHECK(cond, ...)                                                         \
    do {                                                                         \
        checks++;                                                                \
        if (!(cond)) {                                                           \
            failures++;                                                          \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);      \
            fprintf(stderr, __VA_ARGS__);                                        \
            fputc('\n', stderr);                                                 \
        }                                                                        \
    } while (0)

static double norm(const float *v, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)v[i] * v[i];
    return sqrt(s);
}

static unsigned char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc(n > 0 ? (size_t)n : 1);
    *len = buf ? fread(buf, 1, (size_t)n, f) : 0;
    fclose(f);
    return buf;
}

/* The message of request i's failure, or "" */
static const char *msg(const jv4_embedding_view *v) { return v->message ? v->message : ""; }

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s MODEL_DIR IMAGE\n", argv[0]);
        return 2;
    }
    printf("jv4 %s\n", jv4_version());
    jv4_error *err = NULL;

    /* A bad option fails with a message, and no handle. */
    jv4_engine_options bad = {0};
    bad.model_dir = argv[1];
    bad.device = "tpu:0";
    jv4_engine *none = NULL;
    CHECK(jv4_engine_open(&bad, &none, &err) == JV4_ERR_INPUT, "bad device");
    CHECK(none == NULL && strstr(jv4_error_message(err), "tpu:0") != NULL, "%s", jv4_error_message(err));
    jv4_error_free(err);
    err = NULL;

    jv4_engine_options o = {0};
    o.model_dir = argv[1];
    o.device = "cpu";
    o.preprocess_threads = 2;
    jv4_engine *engine = NULL;
    if (jv4_engine_open(&o, &engine, &err) != JV4_OK) {
        fprintf(stderr, "jv4_engine_open: %s\n", jv4_error_message(err));
        jv4_error_free(err);
        return 1;
    }
    size_t dim = 0, mdim = 0;
    CHECK(jv4_engine_dims(engine, &dim, &mdim, NULL) == JV4_OK && dim > 0 && mdim > 0, "dims");

    size_t img_len = 0;
    unsigned char *img = read_file(argv[2], &img_len);
    if (!img) {
        fprintf(stderr, "cannot read %s\n", argv[2]);
        return 1;
    }
    static const uint32_t ids[] = {11, 12, 13, 14, 15, 16};
    static const jv4_span overlapping[] = {{0, 5}, {3, 8}};

    enum { GOOD = 7, N = 13 };
    jv4_request r[N];
    memset(r, 0, sizeof r);
    r[0].text = "What is the capital of France?";
    r[1].text = "Paris is the capital of France.";
    r[1].prompt = "passage";
    r[1].output = JV4_OUTPUT_BOTH;
    r[2].text = "def add(a, b): return a + b";
    r[2].task = "code";
    r[2].dims = 64;
    r[3].text = "Ein kurzer Satz.";
    r[3].task = "text-matching";
    r[3].dims = 128;
    r[4].kind = JV4_INPUT_TOKENS;
    r[4].token_ids = ids;
    r[4].token_ids_len = sizeof ids / sizeof ids[0];
    r[5].kind = JV4_INPUT_IMAGE_PATH;
    r[5].text = argv[2];
    r[5].output = JV4_OUTPUT_BOTH;
    r[6].kind = JV4_INPUT_IMAGE_BYTES;
    r[6].bytes = img;
    r[6].bytes_len = img_len;
    /* The bad ones, each with what its message must name. */
    const char *want[N] = {0};
    r[7].text = "x";
    r[7].task = "classification";
    want[7] = "classification";
    r[8].text = "x";
    r[8].dims = 100;
    want[8] = "dims 100";
    r[9].text = "caf\xff\xfe";
    want[9] = "UTF-8";
    r[10].text = "some text";
    r[10].chunking = JV4_CHUNKING_TOKENS;
    want[10] = "chunk_tokens";
    r[11].text = "hello world";
    r[11].chunking = JV4_CHUNKING_SPANS;
    r[11].spans = overlapping;
    r[11].spans_len = 2;
    want[11] = "overlaps";
    r[12].text = NULL;
    want[12] = "NULL";

    jv4_result *res = NULL;
    CHECK(jv4_embed(engine, r, N, &res, &err) == JV4_OK, "%s", jv4_error_message(err));
    size_t n = 0;
    CHECK(jv4_result_count(res, &n, NULL) == JV4_OK && n == N, "count %zu", n);
    const size_t widths[GOOD] = {dim, dim, 64, 128, dim, dim, dim};
    for (size_t i = 0; i < GOOD; i++) {
        jv4_embedding_view v;
        CHECK(jv4_result_get(res, i, &v, NULL) == JV4_OK, "get %zu", i);
        CHECK(v.status == JV4_OK && v.message == NULL, "request %zu: %s", i, msg(&v));
        CHECK(v.single != NULL && v.single_len == widths[i], "request %zu: %zu values", i, v.single_len);
        CHECK(fabs(norm(v.single, v.single_len) - 1.0) < 1e-4, "request %zu: norm %f", i,
              norm(v.single, v.single_len));
        CHECK(v.tokens > 0 && v.dropped == 0 && v.chunks_len == 0, "request %zu: %zu tokens", i, v.tokens);
        if (i == 1 || i == 5) {
            CHECK(v.multi != NULL && v.multi_dim == mdim && v.multi_rows == v.tokens, "request %zu: %zu rows",
                  i, v.multi_rows);
            for (size_t t = 0; t < v.multi_rows; t++)
                CHECK(fabs(norm(v.multi + t * v.multi_dim, v.multi_dim) - 1.0) < 1e-4, "row %zu", t);
        } else {
            CHECK(v.multi == NULL && v.multi_rows == 0, "request %zu: unasked multi", i);
        }
        if (i == 4) CHECK(v.tokens == sizeof ids / sizeof ids[0], "token request: %zu tokens", v.tokens);
    }
    /* The image by path and by bytes is the same image. */
    jv4_embedding_view a, b;
    jv4_result_get(res, 5, &a, NULL);
    jv4_result_get(res, 6, &b, NULL);
    CHECK(a.single_len == b.single_len && memcmp(a.single, b.single, a.single_len * sizeof(float)) == 0,
          "image path vs bytes");
    for (size_t i = GOOD; i < N; i++) {
        jv4_embedding_view v;
        CHECK(jv4_result_get(res, i, &v, NULL) == JV4_OK, "get %zu", i);
        CHECK(v.status != JV4_OK && v.single == NULL, "request %zu should fail", i);
        CHECK(strstr(msg(&v), want[i]) != NULL, "request %zu: message \"%s\" lacks \"%s\"", i, msg(&v), want[i]);
    }
    jv4_embedding_view v;
    CHECK(jv4_result_get(res, N, &v, &err) == JV4_ERR_INVALID_ARGUMENT, "index past the end");
    jv4_error_free(err);
    err = NULL;

    /* Into a caller buffer: the same vectors as in the result, bit for bit. */
    float *buf = malloc(2 * dim * sizeof(float));
    jv4_status st[2];
    CHECK(jv4_embed_into(engine, r, 2, dim, buf, 2 * dim, st, &err) == JV4_OK, "%s", jv4_error_message(err));
    for (size_t i = 0; i < 2; i++) {
        jv4_result_get(res, i, &v, NULL);
        CHECK(st[i] == JV4_OK && memcmp(buf + i * dim, v.single, dim * sizeof(float)) == 0, "row %zu", i);
    }
    CHECK(jv4_embed_into(engine, r, 2, dim, buf, 2 * dim - 1, st, &err) == JV4_ERR_BUFFER_TOO_SMALL,
          "short buffer");
    CHECK(strstr(jv4_error_message(err), "need") != NULL, "%s", jv4_error_message(err));
    jv4_error_free(err);
    /* A request whose width is not the buffer's fails alone; its row is NaN. */
    CHECK(jv4_embed_into(engine, r + 1, 2, dim, buf, 2 * dim, st, &err) == JV4_ERR_INVALID_ARGUMENT, "width");
    CHECK(st[0] == JV4_OK && st[1] == JV4_ERR_INVALID_ARGUMENT && isnan(buf[dim]), "per-request status");
    CHECK(strstr(jv4_error_message(err), "request 1 of 2") != NULL, "%s", jv4_error_message(err));
    jv4_error_free(err);
    err = NULL;
    free(buf);

    /* Handles: freeing twice is harmless; a freed handle is an error, not a crash. */
    jv4_result_free(res);
    jv4_result_free(res);
    jv4_result_free(NULL);
    CHECK(jv4_result_count(res, &n, &err) == JV4_ERR_BAD_HANDLE, "freed result");
    CHECK(strstr(jv4_error_message(err), "freed") != NULL, "%s", jv4_error_message(err));
    jv4_error_free(err);
    jv4_error_free(err);
    jv4_engine_free(engine);
    jv4_engine_free(engine);
    CHECK(jv4_embed(engine, r, 1, &res, NULL) == JV4_ERR_BAD_HANDLE && res == NULL, "freed engine");
    CHECK(jv4_embed(NULL, r, 1, &res, NULL) == JV4_ERR_NULL_POINTER, "NULL engine");
    free(img);

    if (failures) {
        fprintf(stderr, "embed.c: %d of %d checks failed\n", failures, checks);
        return 1;
    }
    printf("embed.c: %d checks, all passed\n", checks);
    return 0;
}
