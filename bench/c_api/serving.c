/* One request through TensorFlow's C API, as a C++ model server calls a SavedModel: no Python.
 *
 *   serving LIBTENSORFLOW_CC MANIFEST ROUNDS BLOCK BLOCK_WARMUP WARMUP TIMES_OUT OUTPUTS_DIR
 *
 * Built and driven by `python -m bench.serving_c_api`, which writes MANIFEST and the inputs.
 * MANIFEST holds cases, each a signature of a SavedModel and one request's inputs:
 *
 *   case NAME EXPORT_DIR
 *   input TENSOR DTYPE NDIMS DIM... FILE     (DTYPE: TF_DataType's number; FILE: the raw values,
 *                                             or for TF_STRING a uint64 length then the bytes, each)
 *   output TENSOR
 *
 * Each export is loaded once (TF_LoadSessionFromSavedModel, the loader TF Serving uses, with the
 * "serve" tag) and its inputs are built once. After WARMUP calls of every case, the cases take turns
 * for ROUNDS rounds (so that a slow spell of the machine hits each alike): in each round, each case
 * is called BLOCK_WARMUP times untimed (its weights back in the caches after the other cases' calls,
 * as in a server that serves one model), then BLOCK times timed. BLOCK 1 and BLOCK_WARMUP 0 call the
 * cases in turn call by call. TIMES_OUT gets each timed call's wall time in nanoseconds (int64, case
 * after case, ROUNDS x BLOCK each). Then every case runs once more and
 * OUTPUTS_DIR/<case>.<k> gets its k-th output's raw values, so that the caller can check that this
 * path computes what the Python signature does. Errors: one line on stderr, exit status 1.
 *
 * TensorFlow's C API is loaded at run time from LIBTENSORFLOW_CC (the installed wheel's
 * libtensorflow_cc.so.2, 790 MB) rather than linked: linking against it reads its 446,000 dynamic
 * symbols and takes seconds, loading it is what the process does anyway.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tensorflow/c/c_api.h"
#include "tensorflow/c/tf_tstring.h"

/* The C API's functions this program calls, resolved from the library by `load_tensorflow`. */
#define TF_FUNCTIONS(X)                                                                                  \
  X(TF_AllocateTensor) X(TF_CloseSession) X(TF_DataTypeSize) X(TF_DeleteGraph) X(TF_DeleteSession)      \
  X(TF_DeleteSessionOptions) X(TF_DeleteStatus) X(TF_DeleteTensor) X(TF_GetCode)                        \
  X(TF_GraphOperationByName) X(TF_LoadSessionFromSavedModel) X(TF_Message) X(TF_NewGraph)               \
  X(TF_NewSessionOptions) X(TF_NewStatus) X(TF_SessionRun) X(TF_StringCopy) X(TF_StringInit)            \
  X(TF_TensorByteSize) X(TF_TensorData) X(TF_TensorType)
#define DECLARE(name) static __typeof__(&name) p_##name;
TF_FUNCTIONS(DECLARE)

#define MAX_CASES 16
#define MAX_IO 8
#define MAX_DIMS 4

typedef struct {
  char name[256];
  char dir[4096];
  int session;
  int n_in, n_out;
  TF_Output in[MAX_IO], out[MAX_IO];
  TF_Tensor *in_values[MAX_IO];
  char in_names[MAX_IO][256], out_names[MAX_IO][256];
} Case;

typedef struct {
  char dir[4096];
  TF_Graph *graph;
  TF_Session *session;
} Export;

static void die(const char *what, const char *detail) {
  fprintf(stderr, "serving: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
  exit(1);
}

static void load_tensorflow(const char *library) {
  void *lib = dlopen(library, RTLD_NOW | RTLD_GLOBAL);
  if (!lib) die("cannot load TensorFlow's C API", dlerror());
#define RESOLVE(name) \
  if (!(p_##name = (__typeof__(p_##name))dlsym(lib, #name))) die("TensorFlow's library lacks", #name);
  TF_FUNCTIONS(RESOLVE)
}

static void check(TF_Status *status, const char *what) {
  if (p_TF_GetCode(status) != TF_OK) die(what, p_TF_Message(status));
}

static int64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* "op:index" -> the graph's TF_Output. */
static TF_Output find(TF_Graph *graph, const char *tensor) {
  char op[256];
  const char *colon = strrchr(tensor, ':');
  size_t len = colon ? (size_t)(colon - tensor) : strlen(tensor);
  if (len >= sizeof op) die("tensor name too long", tensor);
  memcpy(op, tensor, len);
  op[len] = 0;
  TF_Operation *oper = p_TF_GraphOperationByName(graph, op);
  if (!oper) die("no such tensor in the SavedModel's graph", tensor);
  TF_Output out = {oper, colon ? atoi(colon + 1) : 0};
  return out;
}

static unsigned char *read_file(const char *path, size_t *size) {
  FILE *f = fopen(path, "rb");
  if (!f) die("cannot read", path);
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  unsigned char *data = malloc(n > 0 ? (size_t)n : 1);
  if (n > 0 && fread(data, 1, (size_t)n, f) != (size_t)n) die("short read", path);
  fclose(f);
  *size = (size_t)n;
  return data;
}

static TF_Tensor *make_tensor(int dtype, int ndims, const int64_t *dims, const char *path) {
  size_t size;
  unsigned char *data = read_file(path, &size);
  int64_t count = 1;
  for (int d = 0; d < ndims; d++) count *= dims[d];
  TF_Tensor *t;
  if (dtype == TF_STRING) {
    t = p_TF_AllocateTensor(TF_STRING, dims, ndims, (size_t)count * sizeof(TF_TString));
    TF_TString *s = (TF_TString *)p_TF_TensorData(t);
    size_t at = 0;
    for (int64_t i = 0; i < count; i++) {
      uint64_t len;
      if (at + sizeof len > size) die("string input shorter than its shape", path);
      memcpy(&len, data + at, sizeof len);
      at += sizeof len;
      if (at + len > size) die("string input shorter than its lengths", path);
      p_TF_StringInit(&s[i]);
      p_TF_StringCopy(&s[i], (const char *)data + at, len);
      at += len;
    }
  } else {
    size_t bytes = (size_t)count * p_TF_DataTypeSize((TF_DataType)dtype);
    if (bytes != size) die("input file's size does not match its shape and dtype", path);
    t = p_TF_AllocateTensor((TF_DataType)dtype, dims, ndims, bytes);
    memcpy(p_TF_TensorData(t), data, bytes);
  }
  free(data);
  return t;
}

static int read_manifest(const char *path, Case *cases, Export *exports, int *n_exports) {
  FILE *f = fopen(path, "r");
  if (!f) die("cannot read", path);
  char word[64];
  int n = 0;
  Case *c = NULL;
  while (fscanf(f, "%63s", word) == 1) {
    if (!strcmp(word, "case")) {
      if (n == MAX_CASES) die("too many cases in", path);
      c = &cases[n++];
      memset(c, 0, sizeof *c);
      if (fscanf(f, "%255s %4095s", c->name, c->dir) != 2) die("bad case line in", path);
      c->session = -1;
      for (int e = 0; e < *n_exports; e++)
        if (!strcmp(exports[e].dir, c->dir)) c->session = e;
      if (c->session < 0) {
        if (*n_exports == MAX_CASES) die("too many exports in", path);
        c->session = (*n_exports)++;
        strcpy(exports[c->session].dir, c->dir);
      }
    } else if (!strcmp(word, "input") && c) {
      int dtype, ndims;
      int64_t dims[MAX_DIMS];
      char file[4096];
      if (c->n_in == MAX_IO) die("too many inputs in", path);
      if (fscanf(f, "%255s %d %d", c->in_names[c->n_in], &dtype, &ndims) != 3 || ndims > MAX_DIMS)
        die("bad input line in", path);
      for (int d = 0; d < ndims; d++)
        if (fscanf(f, "%ld", &dims[d]) != 1) die("bad input dims in", path);
      if (fscanf(f, "%4095s", file) != 1) die("bad input file in", path);
      c->in_values[c->n_in++] = make_tensor(dtype, ndims, dims, file);
    } else if (!strcmp(word, "output") && c) {
      if (c->n_out == MAX_IO) die("too many outputs in", path);
      if (fscanf(f, "%255s", c->out_names[c->n_out++]) != 1) die("bad output line in", path);
    } else {
      die("unknown manifest word", word);
    }
  }
  fclose(f);
  return n;
}

static void run_case(Case *c, Export *e, TF_Status *status, TF_Tensor **outputs) {
  p_TF_SessionRun(e->session, NULL, c->in, c->in_values, c->n_in, c->out, outputs, c->n_out, NULL, 0, NULL,
                status);
  check(status, c->name);
}

int main(int argc, char **argv) {
  if (argc != 9)
    die("usage", "serving LIBTENSORFLOW_CC MANIFEST ROUNDS BLOCK BLOCK_WARMUP WARMUP TIMES_OUT OUTPUTS_DIR");
  const char *library = argv[1], *manifest = argv[2], *times_out = argv[7], *outputs_dir = argv[8];
  load_tensorflow(library);
  static Case cases[MAX_CASES];
  static Export exports[MAX_CASES];
  int n_exports = 0;
  int n = read_manifest(manifest, cases, exports, &n_exports);
  long rounds = atol(argv[3]), block = atol(argv[4]), block_warmup = atol(argv[5]), warmup = atol(argv[6]);
  long calls = rounds * block;
  if (n == 0 || rounds < 1 || block < 1 || block_warmup < 0 || warmup < 0) die("nothing to time", manifest);

  TF_Status *status = p_TF_NewStatus();
  const char *tags[] = {"serve"};
  for (int e = 0; e < n_exports; e++) {
    TF_SessionOptions *options = p_TF_NewSessionOptions();
    exports[e].graph = p_TF_NewGraph();
    exports[e].session =
        p_TF_LoadSessionFromSavedModel(options, NULL, exports[e].dir, tags, 1, exports[e].graph, NULL, status);
    check(status, exports[e].dir);
    p_TF_DeleteSessionOptions(options);
  }
  for (int i = 0; i < n; i++) {
    Case *c = &cases[i];
    for (int k = 0; k < c->n_in; k++) c->in[k] = find(exports[c->session].graph, c->in_names[k]);
    for (int k = 0; k < c->n_out; k++) c->out[k] = find(exports[c->session].graph, c->out_names[k]);
  }

  TF_Tensor *outputs[MAX_IO];
  for (int i = 0; i < n; i++)
    for (long w = 0; w < warmup; w++) {
      run_case(&cases[i], &exports[cases[i].session], status, outputs);
      for (int k = 0; k < cases[i].n_out; k++) p_TF_DeleteTensor(outputs[k]);
    }
  int64_t *times = malloc(sizeof(int64_t) * (size_t)n * (size_t)calls);
  for (long r = 0; r < rounds; r++)
    for (int i = 0; i < n; i++) {
      for (long w = 0; w < block_warmup; w++) {
        run_case(&cases[i], &exports[cases[i].session], status, outputs);
        for (int k = 0; k < cases[i].n_out; k++) p_TF_DeleteTensor(outputs[k]);
      }
      for (long b = 0; b < block; b++) {
        int64_t start = now_ns();
        run_case(&cases[i], &exports[cases[i].session], status, outputs);
        for (int k = 0; k < cases[i].n_out; k++) p_TF_DeleteTensor(outputs[k]);
        times[(size_t)i * (size_t)calls + (size_t)(r * block + b)] = now_ns() - start;
      }
    }
  FILE *f = fopen(times_out, "wb");
  if (!f || fwrite(times, sizeof(int64_t), (size_t)n * (size_t)calls, f) != (size_t)n * (size_t)calls)
    die("cannot write", times_out);
  fclose(f);

  char path[8192];
  for (int i = 0; i < n; i++) {
    run_case(&cases[i], &exports[cases[i].session], status, outputs);
    for (int k = 0; k < cases[i].n_out; k++) {
      if (snprintf(path, sizeof path, "%s/%s.%d", outputs_dir, cases[i].name, k) >= (int)sizeof path)
        die("output path too long", outputs_dir);
      FILE *o = fopen(path, "wb");
      if (!o) die("cannot write", path);
      if (p_TF_TensorType(outputs[k]) != TF_STRING)
        fwrite(p_TF_TensorData(outputs[k]), 1, p_TF_TensorByteSize(outputs[k]), o);
      fclose(o);
      p_TF_DeleteTensor(outputs[k]);
    }
  }
  for (int e = 0; e < n_exports; e++) {
    p_TF_CloseSession(exports[e].session, status);
    p_TF_DeleteSession(exports[e].session, status);
    p_TF_DeleteGraph(exports[e].graph);
  }
  p_TF_DeleteStatus(status);
  free(times);
  return 0;
}
