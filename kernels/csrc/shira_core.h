/* The C ABI of the SHiRA switch kernels: no torch, no Python, raw pointers, counts and dtype codes.
 *
 * Three verbs over lists of items (one item = one weight tensor and one adapter's entries on it):
 *
 *   shira_restore  for every item:  w.flat[idx[i]] = saved[i]
 *   shira_apply    for every item:  saved[i] = w.flat[idx[i]];  w.flat[idx[i]] = W(fp32(saved[i]) + delta[i])
 *                  (one visit). 1-byte codes (int8, fp8 e4m3fn, fp8 e5m2) with per-row fp32 scales s:
 *                  code = Q((fp32(code) * s[row] + delta) / s[row]), nearest grid point, ties to even, clamped
 *                  to +-max (each step one fp32 op); clamped entries are added to saturated[item]. With
 *                  delta_is_codes, delta holds new codes of the weight's own dtype, written as they are.
 *                  SHIRA_U8 (an int8 weight [rows][cols] kept as its transposed uint8 copy [cols][rows], the form
 *                  an int8 bundle's graph reads): the code is byte - 128, on the int8 grid, and the scales run
 *                  along the last axis: the scale of flat index j is s[j % n_scales] (n_scales = the copy's
 *                  columns, the weight's rows: the bindings check it against the array's shape; this ABI sees
 *                  only numel and checks that n_scales divides it); its bytes are written as code + 128, byte 0
 *                  never.
 *   shira_switch   shira_restore(outs), then shira_apply(ins): one call, every check before the first write.
 *
 * Every write also updates the item's mirror, if any: kind 1, bf16 [numel] (m.flat[j] = bf16(value(code)), for
 * 1-byte codes); kind 2, uint8 [cols][rows] of 2-D int8 codes [rows][cols] (m[c][r] = code ^ 0x80).
 *
 * Mirror order (optional, kind 2 only): the item's entries in ascending order of their transposed position
 * c * rows + r (a permutation of 0 .. count - 1, of the indices' type, made once by the caller: the adapter's
 * layout). With it the codes are written first, then the mirror in a second pass in that order: its writes walk
 * the copy forwards instead of a row apart (a copy of [cols][rows] written in the codes' order lands every entry
 * on a line of its own far from the last). The result is the same. validate != 0 checks every entry of the order
 * (in range, positions strictly ascending); validate == 0 trusts it (as it trusts the list's order) and checks the
 * first and last entry's range. A restore and an apply of the same weight in one call use their orders only if
 * both have one (else both write the mirror in the first pass).
 *
 * Indices: within one item unique (duplicates make the write order undefined). validate != 0 checks every
 * index (any order); validate == 0 trusts the caller's promise of sorted lists and checks the first and last.
 * Items of one list may alias (the same weight twice, views): then they run one after another in list order.
 *
 * Runs (optional, per item): a description of the index list a caller made once (a block mask's layout): run r =
 * (p, f, n) says entries p .. p + n - 1 hold the indices f .. f + n - 1. Runs are ascending by position, do not
 * overlap, n >= 1. The kernels may then take a run's indices from it instead of reading the list (a block
 * switch streams 24 bytes per run, not 4-8 per entry) and copy or requantize it as one stretch; entries outside
 * every run are read from the list as usual. The list stays what counts: validate != 0 checks every run against
 * it; validate == 0 trusts them and checks the first and last run's bounds (as it does the list's ends).
 * A description replaces the core's own search of a sorted list for lines of consecutive indices: entries outside
 * every described run are visited one by one. A non-NULL `runs` with n_runs = 0 describes a list that holds no
 * run (a random mask's: the search would only cost a test per entry); a NULL `runs` leaves the search on.
 *
 * Return value: 0 done; 1 refused (bad input: `err` holds the message, NOTHING was written); 2 internal error
 * (out of memory; `err` holds the message, NOTHING was written either: every allocation precedes the first write,
 * and a worker thread that cannot be started only means fewer threads). So a call writes all of it or none of it.
 * `err` may be NULL; messages are cut to errlen - 1 bytes.
 * threads: how many threads may work (the caller's included); <= 0 means the machine's hardware threads.
 * Small calls (under shira_tuning's serial_below entries) stay on the calling thread. The library keeps a
 * persistent pool of worker threads; concurrent calls are safe (a call that finds the pool busy runs serially).
 *
 * Build: one C++17 source (shira_core.cpp), no dependencies:  c++ -O3 -ffp-contract=off -std=c++17 -fPIC
 * -shared -pthread shira_core.cpp -o libshira_core.so. The Python package ships it as
 * shira_runtime/kernels/_core*.so (it exports these C symbols only; it is not a Python module).
 */
#ifndef SHIRA_CORE_H
#define SHIRA_CORE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SHIRA_ABI_VERSION 5

/* element types (weights, saved, baked codes) */
enum shira_dtype {
  SHIRA_F32 = 0,
  SHIRA_F16 = 1,
  SHIRA_BF16 = 2,
  SHIRA_I8 = 3,      /* int8 codes on the integer grid [-127, 127] */
  SHIRA_F8E4M3 = 4,  /* fp8 e4m3fn codes (max 448) */
  SHIRA_F8E5M2 = 5,  /* fp8 e5m2 codes (max 57344) */
  SHIRA_U8 = 6       /* int8 codes stored as uint8, zero point 128 (byte = code + 128), with per-COLUMN scales */
};

enum shira_mirror_kind {
  SHIRA_MIRROR_NONE = 0,
  SHIRA_MIRROR_BF16 = 1,  /* bf16 [numel] */
  SHIRA_MIRROR_U8T = 2    /* uint8 [cols][rows] of int8 codes [rows][cols], zero point 128 */
};

typedef struct shira_item {
  void* weight;           /* [numel] elements of `dtype`, C-contiguous, written in place */
  int64_t numel;
  int32_t dtype;          /* enum shira_dtype */
  int32_t index_bits;     /* 32 or 64: the type of `indices` (int32_t / int64_t) */
  const void* indices;    /* [count] flat indices into the weight */
  int64_t count;
  const void* delta;      /* apply: [count] float deltas, or codes of `dtype` (delta_is_codes); restore: unused */
  void* saved;            /* [count] of `dtype`: read by restore, written by apply */
  const float* scales;    /* apply of 1-byte codes with float deltas: [n_scales] per-row scales (per-column for
                             SHIRA_U8); else NULL */
  int64_t n_scales;       /* rows = n_scales, row length = numel / n_scales (must divide; SHIRA_U8: columns); 0 */
  void* mirror;           /* NULL, or the mirror (see mirror_kind); must not overlap the weight */
  int32_t mirror_kind;    /* enum shira_mirror_kind */
  int32_t delta_is_codes; /* apply: delta holds codes of `dtype` (a baked adapter: a byte swap, no scales) */
  int64_t rows, cols;     /* mirror kind 2: the weight's 2-D shape (rows * cols == numel) */
  const int64_t* runs;    /* NULL, or [n_runs][3] (position, first index, length), n_runs >= 0: see "Runs" above */
  int64_t n_runs;
  const void* mirror_order; /* NULL, or [count] entry positions of the indices' type: see "Mirror order" above */
} shira_item;

int shira_restore(const shira_item* items, int64_t n_items, int32_t validate, int32_t threads, char* err,
                  int64_t errlen);
/* saturated: NULL, or int64 [n_items] (clamped entries are added; float items' slots are left alone) */
int shira_apply(const shira_item* items, int64_t n_items, int64_t* saturated, int32_t validate, int32_t threads,
                char* err, int64_t errlen);
int shira_switch(const shira_item* outs, int64_t n_outs, const shira_item* ins, int64_t n_ins, int64_t* saturated,
                 int32_t validate, int32_t threads, char* err, int64_t errlen);

/* Dispatch knobs (tests and benchmarks force every branch with them). A negative argument leaves a knob as
 * it is; current receives {chunk, serial_below, force_plan, prefetch, last_plan, runs}. chunk: entries per
 * parallel task; serial_below: total entries under which a call stays on the calling thread; force_plan: 0 auto,
 * 1 phased, 2 ordered; prefetch: software prefetch distance in entries (0 off); runs: 1 copies contiguous runs
 * of one cache line as blocks (sorted lists); last_plan (read only): bit 0 threaded, bits 1-2: 1 fused, 2 phased,
 * 3 ordered; bit 3: a chunk restored and applied one 1-byte weight in one merged pass. */
void shira_tuning(int64_t chunk, int64_t serial_below, int64_t force_plan, int64_t prefetch, int64_t runs,
                  int64_t* current);
/* A call whose weights (with their copies) reach `bytes` restores and applies each chunk of one 1-byte weight in
 * one merged pass (last_plan bit 3); default half the last-level cache of cpu0 (Linux sysfs), else 8 MiB. A
 * negative argument leaves it as it is; returns the current value. (ABI 5 added it.) */
int64_t shira_merge_above(int64_t bytes);

int32_t shira_abi_version(void);  /* SHIRA_ABI_VERSION of the library */
int64_t shira_item_size(void);    /* sizeof(shira_item) in the library */
const char* shira_source_id(void); /* an id of the source the library was built from (a hash, or "") */

#ifdef __cplusplus
}
#endif

#endif /* SHIRA_CORE_H */
