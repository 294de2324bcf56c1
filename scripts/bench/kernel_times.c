// A CUDA injection library (CUDA_INJECTION64_PATH) that records every kernel, memcpy and memset
// of the process with CUPTI's activity API and writes them as CSV lines
// "kind,start_ns,end_ns,stream,name" to $KERNEL_TIMES_OUT: a kernel timeline of a Rust/libtorch
// process, where nsys is not installed and tch does not expose libtorch's profiler.
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>

static FILE *out;

static void CUPTIAPI requested(uint8_t **buffer, size_t *size, size_t *max_records) {
  *size = 32u << 20;
  *buffer = aligned_alloc(8, *size);
  *max_records = 0;
}

static void CUPTIAPI completed(CUcontext ctx, uint32_t stream, uint8_t *buffer, size_t size,
                               size_t valid) {
  CUpti_Activity *r = NULL;
  (void)ctx; (void)stream; (void)size;
  while (cuptiActivityGetNextRecord(buffer, valid, &r) == CUPTI_SUCCESS) {
    if (r->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL || r->kind == CUPTI_ACTIVITY_KIND_KERNEL) {
      CUpti_ActivityKernel10 *k = (CUpti_ActivityKernel10 *)r;
      fprintf(out, "K,%llu,%llu,%u,%s\n", (unsigned long long)k->start,
              (unsigned long long)k->end, k->streamId, k->name);
    } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      CUpti_ActivityMemcpy6 *m = (CUpti_ActivityMemcpy6 *)r;
      fprintf(out, "C,%llu,%llu,%u,memcpy kind %u (%llu bytes)\n", (unsigned long long)m->start,
              (unsigned long long)m->end, m->streamId, (unsigned)m->copyKind,
              (unsigned long long)m->bytes);
    } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
      CUpti_ActivityMemset4 *m = (CUpti_ActivityMemset4 *)r;
      fprintf(out, "S,%llu,%llu,%u,memset (%llu bytes)\n", (unsigned long long)m->start,
              (unsigned long long)m->end, m->streamId, (unsigned long long)m->bytes);
    }
  }
  fflush(out);
  free(buffer);
}

static void flush_at_exit(void) {
  cuptiActivityFlushAll(1);
  if (out) fflush(out);
}

int InitializeInjection(void) {
  const char *path = getenv("KERNEL_TIMES_OUT");
  out = fopen(path ? path : "kernel-times.csv", "w");
  if (!out) return 0;
  if (cuptiActivityRegisterCallbacks(requested, completed) != CUPTI_SUCCESS) return 0;
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
  cuptiActivityFlushPeriod(200);
  atexit(flush_at_exit);
  return 1;
}
