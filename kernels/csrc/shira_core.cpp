// The switch kernels' core: the C ABI of shira_core.h (restore / apply / switch over raw pointers), no torch.
//
// The Python verbs (shira_runtime.kernels: torch.library ops and numpy arrays) call it through ctypes; their
// signatures are declared once, in runtime/kernels/verbs.py. Semantics are those of
// runtime/kernels/reference.py, bit for bit: for tensor t and entry i
//   restore_: w.flat[idx[i]] = saved[i]
//   apply_:   saved[i] = w.flat[idx[i]];  w.flat[idx[i]] = W(float(saved[i]) + delta[i])   (one visit)
//             1-byte codes of a quantized base (int8 / fp8 e4m3fn / e5m2) with per-row fp32 scales s:
//             w.flat[j] = Q((float(code) * s[row] + delta[i]) / s[row]): nearest grid point, ties to even,
//             clamped to +-max (runtime/qformats.py's encode; each step one fp32 op, no contraction);
//             the clamped entries are counted per tensor. Given codes of the weight's own dtype instead of fp32
//             deltas (an adapter baked for this base), the apply writes them as they are (a byte swap).
//   switch_:  restore_ of the outgoing lists, then apply_ of the incoming ones.
//   Restoring 1-byte codes is a byte scatter.
//   mirrors (optional, per list): a copy of a 1-byte weight that every entry written updates in the same visit:
//             bf16, same numel (an FP8 layer's compute copy, runtime/quantize.py): m.flat[j] = bf16(value(code))
//             (exact: every int8/fp8 value is a bf16 value); or uint8 [cols, rows] for a 2-D int8 weight
//             [rows, cols] (an int8 bundle's MatMulInteger B input): m[c][r] = code ^ 0x80 (code + 128, zero
//             point 128, transposed). An empty tensor: no mirror.
//             A uint8 mirror given with its mirror order (the entries by ascending transposed position) is written
//             after the codes, in a second pass in that order (a restore and an apply of one weight together, cut
//             by transposed position): forwards through the copy, not a row apart per entry.
//
// Execution plans (the one taken is recorded for tests, see shira_last_plan):
//   fused    - all index lists sorted ascending and the weights of each list distinct: each weight's
//              restore and apply entries are cut by element range into chunks, and a chunk restores
//              then applies its range, so the apply re-reads lines the restore just wrote (in cache).
//              A chunk of one 1-byte weight whose entries are visited one by one restores and applies in
//              one merged pass instead (run_merged: lines both touch visited once).
//   phased   - some list not sorted (only known with validate=True): every restore chunk, a barrier,
//              then every apply chunk.
//   ordered  - weights alias in a way the plans above cannot order (same tensor twice in one list,
//              partial overlaps): one list entry at a time, in list order, each entry's chunks in
//              parallel.
// With sorted lists (fused plan, or ordered with sorted lists), aligned-or-not runs of one cache line of
// consecutive indices (a "block" mask) are copied as blocks; everything else is visited entry by entry.
// Chunks are handed out dynamically to the threads of a persistent pool (std::thread, no OpenMP: no clash with
// the OpenMP runtime of a host such as torch); below a size threshold everything runs on the calling thread.
//
// Conversions are those of c10 (PyTorch), bit for bit, ported here so the core needs no torch: fp16 from and to
// fp32 as in the FP16 library (Marat Dukhan, MIT; c10's software path), bf16 round to nearest even with NaN as
// 0x7FC0, fp8 e4m3fn / e5m2 from and to fp32 (c10/util/Float8_e4m3fn.h, Float8_e5m2.h; BSD-3-Clause).

#include "shira_core.h"

#include <pthread.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#define SHIRA_API extern "C" __attribute__((visibility("default")))
#ifndef SHIRA_SOURCE_ID
#define SHIRA_SOURCE_ID ""
#endif

namespace shira {
namespace {

// ---- tuning knobs (tests force every branch through them; see extension.py) ------------------------

std::atomic<int64_t> g_chunk{16384};           // entries per chunk (restore + apply): docs/kernels.md
std::atomic<int64_t> g_serial_below{1 << 15};  // total entries under which no thread is started
std::atomic<int64_t> g_force_plan{0};          // 0 auto, 1 phased, 2 ordered
std::atomic<int64_t> g_prefetch{96};           // software prefetch distance in entries (0: off); runs: see below
std::atomic<int64_t> g_runs{1};               // 1: copy contiguous runs as blocks (sorted lists); 0: off
// Merged passes (run_merged) from this many bytes of weights (and their copies) written by one call: half the
// last-level cache one core reaches (Linux sysfs: cpu0's highest cache level; 8 MiB where it cannot be read).
// Below it those lines stay in that cache between a chunk's restore and its apply, and the merged loop's
// branches cost more than the second visit (docs/kernels.md, "Merged passes"). Not glibc's sysconf: on this AMD
// EPYC it reports the whole package's L3 (320 MiB) where a core's complex has 32 MiB.
int64_t default_merge_above() {
  int64_t best_level = 0, size = 0;
  for (int k = 0; k < 10; ++k) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(k) + "/";
    std::FILE* lf = std::fopen((dir + "level").c_str(), "r");
    if (!lf) break;
    long level = 0, kb = 0;
    char unit = 0;
    const bool ok = std::fscanf(lf, "%ld", &level) == 1;
    std::fclose(lf);
    std::FILE* sf = std::fopen((dir + "size").c_str(), "r");
    if (!sf) continue;
    const int got = std::fscanf(sf, "%ld%c", &kb, &unit);
    std::fclose(sf);
    if (ok && got >= 1 && kb > 0 && level >= best_level) {
      best_level = level;
      size = kb * (unit == 'M' ? 1 << 20 : unit == 'K' ? 1 << 10 : 1);
    }
  }
  return size > 0 ? size / 2 : int64_t{8} << 20;
}
std::atomic<int64_t> g_merge_above{default_merge_above()};
std::atomic<int64_t> g_last_plan{0};           // bit 0: threaded; bits 1-2: 1 fused, 2 phased, 3 ordered; bit 3 merged

// Runs are prefetched nearer than single entries (further made block switches slower: docs/kernels.md): runs found
// in a sorted list a quarter of the distance ahead, in lines; described runs pf * wsize / 16 runs ahead (at 96:
// 24 for fp32, 12 for 16-bit, 6 for 1-byte weights, whose runs carry four times the fp32 deltas of an fp32 run).
inline int64_t run_lines_ahead(int64_t pf) { return pf / 4 + 1; }
inline int64_t runs_ahead(int64_t pf, int64_t wsize) { return pf > 0 ? std::max<int64_t>(1, pf * wsize / 16) : 0; }
// A range no longer than the distance (a small tensor's whole list) would prefetch nothing; there the distance is
// half the range: after inference has evicted the weights, 0.905-0.94x the core's time for a switch over 4-210
// small fp32 tensors and 0.80-0.84x over int8 ones, unchanged with warm caches (docs/results/scaling.md, "With
// cold caches"). The fp8 mirrored path takes it too (its cold figure not measured; warm 0.98-1.00x).
inline int64_t short_distance(int64_t pf, int64_t n) { return pf > 0 && n <= pf ? std::max<int64_t>(4, n / 2) : pf; }

// A refused input: the message goes back through the C ABI (return code 1), nothing written yet.
struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename... A>
[[noreturn]] void refuse(const A&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw InputError(os.str());
}

// ---- element types: c10's conversions, bit for bit ----------------------------------------------

inline uint32_t fp32_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

inline float fp32_from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

inline float fp16_to_fp32(uint16_t h) {  // exact
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & UINT32_C(0x80000000);
  const uint32_t two_w = w + w;
  constexpr uint32_t exp_offset = UINT32_C(0xE0) << 23;
  const float exp_scale = fp32_from_bits(UINT32_C(15) << 23);  // 2^-112
  const float normalized = fp32_from_bits((two_w >> 4) + exp_offset) * exp_scale;
  constexpr uint32_t magic_mask = UINT32_C(126) << 23;
  const float denormalized = fp32_from_bits((two_w >> 17) | magic_mask) - 0.5f;
  constexpr uint32_t denormalized_cutoff = UINT32_C(1) << 27;
  return fp32_from_bits(sign | (two_w < denormalized_cutoff ? fp32_to_bits(denormalized) : fp32_to_bits(normalized)));
}

inline uint16_t fp16_from_fp32(float f) {  // round to nearest even; NaN -> sign | 0x7E00
  const float scale_to_inf = fp32_from_bits(UINT32_C(239) << 23);  // 2^112
  const float scale_to_zero = fp32_from_bits(UINT32_C(17) << 23);  // 2^-110
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = fp32_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & UINT32_C(0x80000000);
  uint32_t bias = shl1_w & UINT32_C(0xFF000000);
  if (bias < UINT32_C(0x71000000)) bias = UINT32_C(0x71000000);
  base = fp32_from_bits((bias >> 1) + UINT32_C(0x07800000)) + base;
  const uint32_t bits = fp32_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & UINT32_C(0x00007C00);
  const uint32_t mantissa_bits = bits & UINT32_C(0x00000FFF);
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > UINT32_C(0xFF000000) ? UINT16_C(0x7E00) : nonsign));
}

inline uint16_t bf16_from_fp32(float f) {  // round to nearest even; NaN -> 0x7FC0
  if (std::isnan(f)) return UINT16_C(0x7FC0);
  const uint32_t u = fp32_to_bits(f);
  return static_cast<uint16_t>((u + (((u >> 16) & 1) + UINT32_C(0x7FFF))) >> 16);
}

inline float fp8e4m3fn_to_fp32(uint8_t input) {
  const uint32_t w = static_cast<uint32_t>(input) << 24;
  const uint32_t sign = w & UINT32_C(0x80000000);
  const uint32_t nonsign = w & UINT32_C(0x7FFFFFFF);
  uint32_t renorm_shift = nonsign != 0 ? __builtin_clz(nonsign) : 32;
  renorm_shift = renorm_shift > 4 ? renorm_shift - 4 : 0;
  const int32_t inf_nan_mask = (static_cast<int32_t>(nonsign + 0x01000000) >> 8) & INT32_C(0x7F800000);
  const int32_t zero_mask = static_cast<int32_t>(nonsign - 1) >> 31;
  const uint32_t result =
      sign | ((((nonsign << renorm_shift >> 4) + ((0x78 - renorm_shift) << 23)) | inf_nan_mask) & ~zero_mask);
  return fp32_from_bits(result);
}

inline uint8_t fp8e4m3fn_from_fp32(float f) {
  constexpr uint32_t fp8_max = UINT32_C(1087) << 20;
  constexpr uint32_t denorm_mask = UINT32_C(141) << 23;
  uint32_t f_bits = fp32_to_bits(f);
  uint8_t result = 0u;
  const uint32_t sign = f_bits & UINT32_C(0x80000000);
  f_bits ^= sign;
  if (f_bits >= fp8_max) {
    result = f_bits > UINT32_C(0x7F800000) ? 0x7f : 0x7e;
  } else if (f_bits < (UINT32_C(121) << 23)) {
    f_bits = fp32_to_bits(fp32_from_bits(f_bits) + fp32_from_bits(denorm_mask));
    result = static_cast<uint8_t>(f_bits - denorm_mask);
  } else {
    const uint8_t mant_odd = (f_bits >> 20) & 1;
    f_bits += (static_cast<uint32_t>(7 - 127) << 23) + 0x7FFFF;
    f_bits += mant_odd;
    result = static_cast<uint8_t>(f_bits >> 20);
    if (result == 0x7f) result = 0x7e;
  }
  return result | static_cast<uint8_t>(sign >> 24);
}

inline float fp8e5m2_to_fp32(uint8_t input) { return fp16_to_fp32(static_cast<uint16_t>(input << 8)); }

inline uint8_t fp8e5m2_from_fp32(float f) {
  constexpr uint32_t fp32_inf = UINT32_C(255) << 23;
  constexpr uint32_t fp8_max = UINT32_C(143) << 23;
  constexpr uint32_t denorm_mask = UINT32_C(134) << 23;
  uint32_t f_bits = fp32_to_bits(f);
  uint8_t result = 0u;
  const uint32_t sign = f_bits & UINT32_C(0x80000000);
  f_bits ^= sign;
  if (f_bits >= fp8_max) {
    result = f_bits > fp32_inf ? UINT8_C(0x7F) : UINT8_C(0x7C);
  } else if (f_bits < (UINT32_C(113) << 23)) {
    f_bits = fp32_to_bits(fp32_from_bits(f_bits) + fp32_from_bits(denorm_mask));
    result = static_cast<uint8_t>(f_bits - denorm_mask);
  } else {
    const uint32_t mant_odd = (f_bits >> 21) & 1;
    f_bits += (static_cast<uint32_t>(15 - 127) << 23) + 0xFFFFF;
    f_bits += mant_odd;
    result = static_cast<uint8_t>(f_bits >> 21);
  }
  return result | static_cast<uint8_t>(sign >> 24);
}

struct Half {  // fp16 bits
  uint16_t x;
  explicit operator float() const { return fp16_to_fp32(x); }
};

struct BF16 {  // bf16 bits
  uint16_t x;
  explicit operator float() const { return fp32_from_bits(static_cast<uint32_t>(x) << 16); }
};

inline bool is_code(int32_t t) {
  return t == SHIRA_I8 || t == SHIRA_F8E4M3 || t == SHIRA_F8E5M2 || t == SHIRA_U8;
}

const char* dtype_name(int32_t t) {
  switch (t) {
    case SHIRA_F32: return "float32";
    case SHIRA_F16: return "float16";
    case SHIRA_BF16: return "bfloat16";
    case SHIRA_I8: return "int8";
    case SHIRA_F8E4M3: return "float8_e4m3fn";
    case SHIRA_F8E5M2: return "float8_e5m2";
    case SHIRA_U8: return "uint8";
    default: return "unknown";
  }
}

enum Plan : int64_t { kFused = 1, kPhased = 2, kOrdered = 3 };

// ---- one tensor of one list ----------------------------------------------------------------------

struct Item {
  char* w;                   // weight data, flat
  int64_t numel;             // weight elements
  size_t nbytes;             // weight bytes
  int32_t wtype;             // shira_dtype: fp32 / fp16 / bf16, or int8 / fp8 e4m3fn / fp8 e5m2 codes
  const void* idx;           // [n] int32 or int64
  bool idx64;
  int64_t n;
  const float* delta;        // [n] (apply only)
  void* saved;               // [n] weight dtype
  bool apply;                // an apply_ entry (else a restore_ entry)
  const float* scales;       // per-row scales of 1-byte codes (apply only; SHIRA_U8: per column), else null
  int64_t row_len;           // elements per scale row; SHIRA_U8: the number of columns (scale of j: j % row_len)
  int64_t* saturated;        // where this entry's clamped count is added (apply of 1-byte codes), or null
  const uint8_t* codes;      // [n] new codes of a 1-byte weight (apply of a baked adapter: a swap), or null
  void* mirror;              // kept in step with the codes, or null: bf16 bits [numel], or uint8 [cols, rows]
  bool mirror_u8t;           // the mirror is the transposed zero-point-128 uint8 copy (int8 codes)
  int64_t mrows, mcols;      // the weight's [rows, cols] (uint8 mirror)
  int64_t pos;               // position in its list, for messages
  const char* list;          // "" or "outgoing " / "incoming " (switch_)
  const int64_t* runs;       // [n_runs][3] (position, first index, length), or null (shira_core.h, "Runs")
  int64_t n_runs;
  bool described;            // runs were given (n_runs >= 0): no search for more (shira_core.h, "Runs")
  int64_t wsize;             // bytes per weight element
  // The uint8 mirror written in a second pass (shira_core.h, "Mirror order"): `mirror` is then null (the first
  // pass writes the codes alone), `later` the copy and `order` the entries by ascending transposed position;
  // `fresh` [n]: the new codes of an apply, gathered after its first pass (the call owns it), or the baked codes.
  const void* order;
  uint8_t* later;
  const uint8_t* fresh;
};

inline int64_t index_at(const Item& it, int64_t i) {
  return it.idx64 ? static_cast<const int64_t*>(it.idx)[i] : static_cast<const int32_t*>(it.idx)[i];
}

// First position in [lo, hi) whose index is >= value (the list is sorted ascending).
int64_t lower_bound_pos(const Item& it, int64_t lo, int64_t hi, int64_t value) {
  if (it.idx64) {
    const int64_t* p = static_cast<const int64_t*>(it.idx);
    return std::lower_bound(p + lo, p + hi, value) - p;
  }
  const int32_t* p = static_cast<const int32_t*>(it.idx);
  return std::lower_bound(p + lo, p + hi, value) - p;
}

// ---- inner loops ---------------------------------------------------------------------------------

template <typename W>
inline W from_float(float v);  // round to nearest even, like Tensor.to()
template <>
inline float from_float<float>(float v) {
  return v;
}
template <>
inline Half from_float<Half>(float v) {
  return Half{fp16_from_fp32(v)};
}
template <>
inline BF16 from_float<BF16>(float v) {
  return BF16{bf16_from_fp32(v)};
}
template <>
inline uint8_t from_float<uint8_t>(float v) {  // instantiated, never called: 1-byte codes go through requantize
  return static_cast<uint8_t>(v);
}

// Runs: with sorted unique indices, idx[i + K - 1] == idx[i] + K - 1 means entries i .. i + K - 1 are one
// contiguous run of K elements (K = one 64-byte line of W). A cache-line mask (runtime.masks "block") is made
// of such runs; they are copied as a block (vectorized, no per-entry prefetch), everything else entry by
// entry. Only valid for sorted lists: callers pass runs = false otherwise.
template <typename W>
constexpr int64_t kRun = 64 / static_cast<int64_t>(sizeof(W));

template <typename I>
inline bool run_at(const I* __restrict__ idx, int64_t i, int64_t e, int64_t k) {
  // the neighbour test first: it fails at once for a scattered (random) mask
  return i + k <= e && idx[i + 1] == idx[i] + 1 &&
         static_cast<int64_t>(idx[i + k - 1]) - static_cast<int64_t>(idx[i]) == k - 1;
}

// body(i) for entries i in [b, e), each after ahead(i) (the prefetch of entry i + pf's lines) while i + pf < e:
// the test is the loop's bound, not a branch per entry (then a tail without prefetch).
template <bool kPrefetch, typename A, typename B>
inline void each_entry(int64_t b, int64_t e, int64_t pf, A&& ahead, B&& body) {
  int64_t i = b;
  if constexpr (kPrefetch)
    for (const int64_t stop = e - pf; i < stop; ++i) {
      ahead(i);
      body(i);
    }
  for (; i < e; ++i) body(i);
}

template <typename W, typename I, bool kPrefetch>
void restore_range(W* __restrict__ w, const I* __restrict__ idx, const W* __restrict__ saved, int64_t b,
                   int64_t e, int64_t pf, bool runs) {
  constexpr int64_t K = kRun<W>;
  int64_t i = b;
  if (!runs)  // entry by entry
    return each_entry<kPrefetch>(
        b, e, pf, [&](int64_t k) { __builtin_prefetch(w + idx[k + pf], 1, 3); },
        [&](int64_t k) { w[idx[k]] = saved[k]; });
  while (i < e) {
    if (runs && run_at(idx, i, e, K)) {
      if constexpr (kPrefetch) {  // the distance counts lines: K entries per line in a run
        if (i + run_lines_ahead(pf) * K < e) __builtin_prefetch(w + idx[i + run_lines_ahead(pf) * K], 1, 3);
      }
      W* __restrict__ p = w + idx[i];
      const W* __restrict__ s = saved + i;
      for (int64_t k = 0; k < K; ++k) p[k] = s[k];
      i += K;
    } else {
      if constexpr (kPrefetch) {
        if (i + pf < e) __builtin_prefetch(w + idx[i + pf], 1, 3);
      }
      w[idx[i]] = saved[i];
      ++i;
    }
  }
}

template <typename W, typename I>
inline void apply_one(W* __restrict__ w, const I* __restrict__ idx, const float* __restrict__ delta,
                      W* __restrict__ saved, int64_t i) {
  W* p = w + idx[i];
  const W old = *p;
  saved[i] = old;
  *p = from_float<W>(static_cast<float>(old) + delta[i]);
}

template <typename W, typename I, bool kPrefetch>
void apply_range(W* __restrict__ w, const I* __restrict__ idx, const float* __restrict__ delta,
                 W* __restrict__ saved, int64_t b, int64_t e, int64_t pf, bool runs) {
  constexpr int64_t K = kRun<W>;
  int64_t i = b;
  if (!runs)  // entry by entry
    return each_entry<kPrefetch>(
        b, e, pf, [&](int64_t k) { __builtin_prefetch(w + idx[k + pf], 1, 3); },
        [&](int64_t k) { apply_one(w, idx, delta, saved, k); });
  while (i < e) {
    if (runs && run_at(idx, i, e, K)) {
      if constexpr (kPrefetch) {  // the distance counts lines: K entries per line in a run
        if (i + run_lines_ahead(pf) * K < e) __builtin_prefetch(w + idx[i + run_lines_ahead(pf) * K], 1, 3);
      }
      W* __restrict__ p = w + idx[i];
      W* __restrict__ s = saved + i;
      const float* __restrict__ d = delta + i;
      for (int64_t k = 0; k < K; ++k) {
        const W old = p[k];
        s[k] = old;
        p[k] = from_float<W>(static_cast<float>(old) + d[k]);
      }
      i += K;
    } else {
      if constexpr (kPrefetch) {
        if (i + pf < e) __builtin_prefetch(w + idx[i + pf], 1, 3);
      }
      apply_one(w, idx, delta, saved, i);
      ++i;
    }
  }
}

// ---- 1-byte codes on a quantized grid ------------------------------------------------------------
// F: 0 int8 (integers in [-127, 127]), 1 fp8 e4m3fn (3 mantissa bits, bias 7, max 448), 2 fp8 e5m2 (2, 15, 57344),
// 3 int8 codes kept as uint8 bytes code + 128 (SHIRA_U8: the int8 grid; its scales run along the columns).
template <int F>
struct QGrid;
template <>
struct QGrid<0> {
  static constexpr int man = 0, bias = 0;
  static constexpr float max = 127.0f;
};
template <>
struct QGrid<1> {
  static constexpr int man = 3, bias = 7;
  static constexpr float max = 448.0f;
};
template <>
struct QGrid<2> {
  static constexpr int man = 2, bias = 15;
  static constexpr float max = 57344.0f;
};
template <>
struct QGrid<3> : QGrid<0> {};

// Round to nearest, ties to even, in the default rounding mode: exact for |v| < 2^22 (v + 1.5 * 2^23 lands where
// the spacing is 1). Larger values are left as they are: every value reaching it here is clamped (saturated) or,
// past 2^23, already an integer.
inline float round_even(float v) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  if (std::fabs(v) < 4194304.0f) {       // 2^22
    // two roundings, kept as written (no -ffast-math); copysign: -0.3 rounds to -0, as torch.round gives
    return std::copysign((v + kMagic) - kMagic, v);
  }
  return v;
}

inline float pow2(int e) {  // 2^e for -126 <= e <= 127, exact
  const uint32_t b = static_cast<uint32_t>(e + 127) << 23;
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

// x (already divided by the scale) rounded to the grid of F, not clamped: qformats.round_to_grid, bit for bit.
template <int F>
inline float to_grid(float x) {
  if constexpr (F == 0 || F == 3) {
    return round_even(x);
  } else {
    uint32_t b;
    std::memcpy(&b, &x, sizeof b);
    // frexp's exponent is biased - 126 (zero and fp32 subnormals fall under the clamp below either way)
    const int ex = static_cast<int>((b >> 23) & 0xFF) - 126;
    const int eb = std::max(ex - 1, 1 - QGrid<F>::bias);  // the binade; subnormals share the lowest one's step
    const int se = std::min(eb - QGrid<F>::man, 127);     // an Inf x: any finite step keeps it Inf
    return round_even(x * pow2(-se)) * pow2(se);          // x * 2^-se == x / 2^se exactly (a power of two)
  }
}

template <int F>
struct Codes {
  std::array<float, 256> value;    // code byte -> its value (fp8: c10's exact conversion)
  std::array<uint16_t, 256> bf16;  // code byte -> the bits of its value in bf16 (exact but for NaN payloads)
  Codes() {
    for (int c = 0; c < 256; ++c) {
      const uint8_t u = static_cast<uint8_t>(c);
      if constexpr (F == 0)
        value[c] = static_cast<float>(static_cast<int8_t>(u));
      else if constexpr (F == 3)
        value[c] = static_cast<float>(c - 128);
      else if constexpr (F == 1)
        value[c] = fp8e4m3fn_to_fp32(u);
      else
        value[c] = fp8e5m2_to_fp32(u);
      bf16[c] = bf16_from_fp32(value[c]);
    }
  }
};

template <int F>
const Codes<F>& codes() {
  static const Codes<F> table;
  return table;
}

// r on the grid and within +-max: its code byte (exact: no rounding happens).
template <int F>
inline uint8_t encode_exact(float r) {
  if constexpr (F == 0)
    return static_cast<uint8_t>(static_cast<int8_t>(r));
  else if constexpr (F == 3)
    return static_cast<uint8_t>(static_cast<int32_t>(r) + 128);
  else if constexpr (F == 1)
    return fp8e4m3fn_from_fp32(r);
  else
    return fp8e5m2_from_fp32(r);
}

// One entry: returns the new code, counts a clamp.
template <int F>
inline uint8_t requantize(const Codes<F>& table, uint8_t old, float scale, float delta, int64_t& clamped) {
  const float v = table.value[old] * scale;  // deq(code)
  const float x = (v + delta) / scale;       // back on the code axis (fp32 ops, one rounding each)
  float r = to_grid<F>(x);
  if (std::fabs(r) > QGrid<F>::max) {
    ++clamped;
    r = std::copysign(QGrid<F>::max, r);
  }
  return encode_exact<F>(r);
}

// x / d and x % d for 0 <= x < 2^52 through a double reciprocal, corrected by one step: the transposed copy's
// positions (and a uint8 weight's columns) need a division per entry, and a 64-bit divide would cost more than the write it places.
struct DivBy {
  int64_t d;
  double inv;
  explicit DivBy(int64_t den) : d(den > 0 ? den : 1), inv(1.0 / static_cast<double>(den > 0 ? den : 1)) {}
  inline void split(int64_t x, int64_t& q, int64_t& r) const {
    q = static_cast<int64_t>(static_cast<double>(x) * inv);
    r = x - q * d;
    if (r < 0) {
      --q;
      r += d;
    } else if (r >= d) {
      ++q;
      r -= d;
    }
  }
};

// Row of flat index j, from the previous row when j is still inside it (sorted lists: one division per row).
struct RowCursor {
  int64_t len, row = -1, lo = 0, hi = 0;
  inline int64_t at(int64_t j) {
    if (j < lo || j >= hi) {
      row = j / len;
      lo = row * len;
      hi = lo + len;
    }
    return row;
  }
};

// A run of n int8 codes of one row (one scale), written as requantize<0> writes each, in a loop the compiler
// vectorizes: no table (an int8 code's value is the integer), the rounding and the clamp as selects. Bit for bit
// the entry-by-entry loop: the same fp32 operations in the same order on every lane. Returns the clamped count.
// -fno-trapping-math for this loop only (GCC): the selects may then evaluate both sides, which lets it vectorize;
// values are unchanged (FP exception flags are all it gives up; nothing reads them). On x86-64 with glibc it is
// also built for AVX2, picked at load time where the CPU has it (8 lanes, not 4: the divisions bound this loop;
// IEEE division gives the same bits at any width).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
#define SHIRA_SELECTS __attribute__((optimize("no-trapping-math"), target_clones("avx2", "default"), noinline))
#elif defined(__GNUC__) && !defined(__clang__)
#define SHIRA_SELECTS __attribute__((optimize("no-trapping-math"))) inline
#else
#define SHIRA_SELECTS inline
#endif
SHIRA_SELECTS int64_t int8_run(uint8_t* __restrict__ p, uint8_t* __restrict__ s, const float* __restrict__ d, float scale,
                        int64_t n) {
  constexpr float kMagic = 12582912.0f;  // round_even's
  int32_t clamped = 0;
  for (int64_t k = 0; k < n; ++k) {
    const uint8_t old = p[k];
    s[k] = old;
    const float v = static_cast<float>(static_cast<int8_t>(old)) * scale;
    const float x = (v + d[k]) / scale;
    const float rounded = __builtin_copysignf((x + kMagic) - kMagic, x);
    float r = __builtin_fabsf(x) < 4194304.0f ? rounded : x;
    const float ar = __builtin_fabsf(r);
    clamped += static_cast<int32_t>(ar > 127.0f);
    const float lim = __builtin_copysignf(127.0f, r);
    r = ar > 127.0f ? lim : r;
    p[k] = static_cast<uint8_t>(static_cast<int32_t>(r));
  }
  return clamped;
}

// int8_run for a uint8 weight (SHIRA_U8): bytes code + 128, one scale per lane (a stretch of one row of the
// [cols][rows] copy runs along the columns of its per-column scales). The same fp32 operations as requantize<3>.
SHIRA_SELECTS int64_t u8_run(uint8_t* __restrict__ p, uint8_t* __restrict__ s, const float* __restrict__ d,
                             const float* __restrict__ sc, int64_t n) {
  constexpr float kMagic = 12582912.0f;  // round_even's
  int32_t clamped = 0;
  for (int64_t k = 0; k < n; ++k) {
    const uint8_t old = p[k];
    s[k] = old;
    const float scale = sc[k];
    const float v = static_cast<float>(static_cast<int32_t>(old) - 128) * scale;
    const float x = (v + d[k]) / scale;
    const float rounded = __builtin_copysignf((x + kMagic) - kMagic, x);
    float r = __builtin_fabsf(x) < 4194304.0f ? rounded : x;
    const float ar = __builtin_fabsf(r);
    clamped += static_cast<int32_t>(ar > 127.0f);
    const float lim = __builtin_copysignf(127.0f, r);
    r = ar > 127.0f ? lim : r;
    p[k] = static_cast<uint8_t>(static_cast<int32_t>(r) + 128);
  }
  return clamped;
}

// One apply entry i on the grid: its scale (per row; SHIRA_U8: per column, from the row's start: one division per
// row of a sorted list) and the grid write; clamps are counted in `clamped`.
template <int F, typename I>
struct GridEntry {
  const Codes<F>& table;
  uint8_t* __restrict__ w;
  const I* __restrict__ idx;
  const float* __restrict__ delta;
  uint8_t* __restrict__ saved;
  const float* __restrict__ scales;
  RowCursor rows;
  int64_t clamped = 0;
  inline void operator()(int64_t i) {
    const int64_t j = idx[i];
    const uint8_t old = w[j];
    saved[i] = old;
    float scale;
    if constexpr (F == 3) {
      rows.at(j);
      scale = scales[j - rows.lo];
    } else {
      scale = scales[rows.at(j)];
    }
    w[j] = requantize<F>(table, old, scale, delta[i], clamped);
  }
};

template <int F, typename I, bool kPrefetch>
int64_t apply_range_q(uint8_t* __restrict__ w, const I* __restrict__ idx, const float* __restrict__ delta,
                      uint8_t* __restrict__ saved, const float* __restrict__ scales, int64_t row_len, int64_t b,
                      int64_t e, int64_t pf, bool runs) {
  GridEntry<F, I> one{codes<F>(), w, idx, delta, saved, scales, RowCursor{row_len}};
  RowCursor& rows = one.rows;
  const DivBy cols(row_len);  // F == 3 (SHIRA_U8): row_len columns, the scale of j is scales[j % row_len]
  int64_t& clamped = one.clamped;
  if (!runs) {  // entry by entry
    each_entry<kPrefetch>(b, e, pf, [&](int64_t k) { __builtin_prefetch(w + idx[k + pf], 1, 3); }, one);
    return clamped;
  }
  constexpr int64_t K = kRun<uint8_t>;
  for (int64_t i = b; i < e; ++i) {
    if constexpr (F == 3) {  // a line of consecutive bytes inside one row: consecutive columns' scales
      if (runs && run_at(idx, i, e, K)) {
        const int64_t j = idx[i];
        int64_t q, c;
        cols.split(j, q, c);
        if (c + K <= row_len) {
          if constexpr (kPrefetch) {
            if (i + run_lines_ahead(pf) * K < e) __builtin_prefetch(w + idx[i + run_lines_ahead(pf) * K], 1, 3);
          }
          clamped += u8_run(w + j, saved + i, delta + i, scales + c, K);
          i += K - 1;
          continue;
        }
      }
    }
    if constexpr (F == 0) {  // a line of consecutive codes inside one row: the vectorized loop
      if (runs && run_at(idx, i, e, K)) {
        const int64_t j = idx[i];
        const int64_t row = rows.at(j);
        if (j + K <= rows.hi) {
          if constexpr (kPrefetch) {  // the distance counts lines: K entries per line in a run
            if (i + run_lines_ahead(pf) * K < e) __builtin_prefetch(w + idx[i + run_lines_ahead(pf) * K], 1, 3);
          }
          clamped += int8_run(w + j, saved + i, delta + i, scales[row], K);
          i += K - 1;
          continue;
        }
      }
    }
    if constexpr (kPrefetch) {
      if (i + pf < e) __builtin_prefetch(w + idx[i + pf], 1, 3);
    }
    one(i);
  }
  return clamped;
}

template <int F, typename I>
int64_t apply_q(const Item& it, uint8_t* w, const I* idx, uint8_t* saved, int64_t b, int64_t e, int64_t pf,
                bool runs) {
  return pf > 0 ? apply_range_q<F, I, true>(w, idx, it.delta, saved, it.scales, it.row_len, b, e, pf, runs)
                : apply_range_q<F, I, false>(w, idx, it.delta, saved, it.scales, it.row_len, b, e, 0, runs);
}

// Baked codes: saved[i] = w[j]; w[j] = codes[i] (a byte swap, no grid math).
template <typename I, bool kPrefetch>
void swap_range(uint8_t* __restrict__ w, const I* __restrict__ idx, const uint8_t* __restrict__ codes,
                uint8_t* __restrict__ saved, int64_t b, int64_t e, int64_t pf) {
  auto one = [&](int64_t i) {
    uint8_t* p = w + idx[i];
    saved[i] = *p;
    *p = codes[i];
  };
  each_entry<kPrefetch>(b, e, pf, [&](int64_t k) { __builtin_prefetch(w + idx[k + pf], 1, 3); }, one);
}

// One entry with a mirror: restore (apply == false: w[j] = saved[i]) or apply (a swap of baked codes, or the grid
// write), and the mirror's entry j set from the new code, in one visit.
template <int F, typename I, bool kU8T>
inline void mirrored_one(const Item& it, const Codes<F>& table, uint8_t* __restrict__ w, uint16_t* __restrict__ m,
                         uint8_t* __restrict__ mt, const I* __restrict__ idx, uint8_t* __restrict__ saved,
                         RowCursor& rows, RowCursor& mrow, bool apply, int64_t i, int64_t& clamped) {
  const int64_t j = idx[i];
  uint8_t c;
  if (!apply) {
    c = saved[i];
  } else {
    const uint8_t old = w[j];
    saved[i] = old;
    c = it.codes ? it.codes[i] : requantize<F>(table, old, it.scales[rows.at(j)], it.delta[i], clamped);
  }
  w[j] = c;
  if constexpr (kU8T) {
    const int64_t r = mrow.at(j);
    mt[(j - mrow.lo) * it.mrows + r] = static_cast<uint8_t>(c ^ 0x80);
  } else {
    m[j] = table.bf16[c];
  }
}

// Entries [b, e) with a mirror (mirrored_one), the lines of entry i + pf prefetched in the weight and the mirror
// (unconditionally up to the last distance, then a tail without). Returns the clamped count.
template <int F, typename I, bool kPrefetch, bool kU8T>
int64_t mirrored_range(const Item& it, bool apply, int64_t b, int64_t e, int64_t pf) {
  const Codes<F>& table = codes<F>();
  uint8_t* __restrict__ w = reinterpret_cast<uint8_t*>(it.w);
  uint16_t* __restrict__ m = static_cast<uint16_t*>(it.mirror);
  uint8_t* __restrict__ mt = static_cast<uint8_t*>(it.mirror);
  const I* __restrict__ idx = static_cast<const I*>(it.idx);
  uint8_t* __restrict__ saved = static_cast<uint8_t*>(it.saved);
  RowCursor rows{it.row_len};
  RowCursor mrow{it.mcols};  // the uint8 mirror: row and column of j in the weight
  int64_t clamped = 0;
  auto ahead = [&](int64_t k) {
    const int64_t jp = idx[k + pf];
    __builtin_prefetch(w + jp, 1, 3);
    if constexpr (kU8T)  // the transposed copy: entry (r, c) at c * rows + r, a line of its own
      __builtin_prefetch(mt + (jp % it.mcols) * it.mrows + jp / it.mcols, 1, 3);
    else
      __builtin_prefetch(m + jp, 1, 3);
  };
  each_entry<kPrefetch>(b, e, pf, ahead, [&](int64_t k) {
    mirrored_one<F, I, kU8T>(it, table, w, m, mt, idx, saved, rows, mrow, apply, k, clamped);
  });
  return clamped;
}

// The second pass of a deferred uint8 mirror: entries k in [b, e) of the item's order, whose transposed
// positions ascend, so the copy is written forwards: m[c][r] = code ^ 0x80 for entry p = order[k] at j = idx[p]
// (r, c = j / cols, j % cols), the code being saved[p] (restore) or fresh[p] (apply). It reads the index list and
// the codes at random within the item's own arrays, never the weight.
template <typename I>
void mirror_pass(const Item& it, bool apply, int64_t b, int64_t e) {
  const I* __restrict__ order = static_cast<const I*>(it.order);
  const I* __restrict__ idx = static_cast<const I*>(it.idx);
  const uint8_t* __restrict__ src = apply ? it.fresh : static_cast<const uint8_t*>(it.saved);
  uint8_t* __restrict__ mt = it.later;
  const int64_t rows = it.mrows;
  const DivBy cols(it.mcols);
  const int64_t pf = g_prefetch.load(std::memory_order_relaxed) / 4;
  for (int64_t k = b; k < e; ++k) {
    if (pf > 0 && k + pf < e) __builtin_prefetch(idx + order[k + pf], 0, 3);
    const int64_t p = order[k];
    int64_t r, c;
    cols.split(static_cast<int64_t>(idx[p]), r, c);
    mt[c * rows + r] = static_cast<uint8_t>(src[p] ^ 0x80);
  }
}

// The new codes of an apply's entries [b, e), read back from the weight right after its first pass wrote them
// (their lines are still in cache), for the mirror's second pass.
template <typename I>
void gather_fresh(const Item& it, int64_t b, int64_t e) {
  const I* __restrict__ idx = static_cast<const I*>(it.idx);
  const uint8_t* __restrict__ w = reinterpret_cast<const uint8_t*>(it.w);
  uint8_t* __restrict__ out = const_cast<uint8_t*>(it.fresh);
  for (int64_t i = b; i < e; ++i) out[i] = w[idx[i]];
}

template <int F, typename I>
void run_mirrored(const Item& it, bool apply, int64_t b, int64_t e) {
  const int64_t pf = short_distance(g_prefetch.load(std::memory_order_relaxed), e - b);
  int64_t clamped;
  if (it.mirror_u8t)
    clamped = pf > 0 ? mirrored_range<F, I, true, true>(it, apply, b, e, pf)
                     : mirrored_range<F, I, false, true>(it, apply, b, e, 0);
  else
    clamped = pf > 0 ? mirrored_range<F, I, true, false>(it, apply, b, e, pf)
                     : mirrored_range<F, I, false, false>(it, apply, b, e, 0);
  if (clamped && it.saturated) __atomic_fetch_add(it.saturated, clamped, __ATOMIC_RELAXED);
}

template <typename I>
void run_mirrored(const Item& it, bool apply, int64_t b, int64_t e) {
  if (b >= e) return;
  switch (it.wtype) {
    case SHIRA_I8:
      return run_mirrored<0, I>(it, apply, b, e);
    case SHIRA_F8E4M3:
      return run_mirrored<1, I>(it, apply, b, e);
    case SHIRA_F8E5M2:
      return run_mirrored<2, I>(it, apply, b, e);
    default:
      throw std::logic_error("shira: unreachable code dtype");
  }
}

template <typename I>
void run_range_q(const Item& it, int64_t b, int64_t e, bool runs) {
  if (b >= e) return;
  runs = runs && g_runs.load(std::memory_order_relaxed);
  uint8_t* w = reinterpret_cast<uint8_t*>(it.w);
  const I* idx = static_cast<const I*>(it.idx);
  uint8_t* saved = static_cast<uint8_t*>(it.saved);
  const int64_t pf = short_distance(g_prefetch.load(std::memory_order_relaxed), e - b);
  if (it.codes) {
    if (pf > 0)
      swap_range<I, true>(w, idx, it.codes, saved, b, e, pf);
    else
      swap_range<I, false>(w, idx, it.codes, saved, b, e, 0);
    return;
  }
  int64_t clamped = 0;
  switch (it.wtype) {
    case SHIRA_I8:
      clamped = apply_q<0, I>(it, w, idx, saved, b, e, pf, runs);
      break;
    case SHIRA_F8E4M3:
      clamped = apply_q<1, I>(it, w, idx, saved, b, e, pf, runs);
      break;
    case SHIRA_F8E5M2:
      clamped = apply_q<2, I>(it, w, idx, saved, b, e, pf, runs);
      break;
    case SHIRA_U8:
      clamped = apply_q<3, I>(it, w, idx, saved, b, e, pf, runs);
      break;
    default:
      throw std::logic_error("shira: unreachable code dtype");
  }
  if (clamped && it.saturated) __atomic_fetch_add(it.saturated, clamped, __ATOMIC_RELAXED);
}


template <typename W, typename I>
void run_range(const Item& it, bool apply, int64_t b, int64_t e, bool runs) {
  if (b >= e) return;
  W* w = reinterpret_cast<W*>(it.w);
  const I* idx = static_cast<const I*>(it.idx);
  W* saved = static_cast<W*>(it.saved);
  const int64_t pf = short_distance(g_prefetch.load(std::memory_order_relaxed), e - b);
  runs = runs && g_runs.load(std::memory_order_relaxed);
  if (apply) {
    if (pf > 0)
      apply_range<W, I, true>(w, idx, it.delta, saved, b, e, pf, runs);
    else
      apply_range<W, I, false>(w, idx, it.delta, saved, b, e, 0, runs);
  } else {
    if (pf > 0)
      restore_range<W, I, true>(w, idx, saved, b, e, pf, runs);
    else
      restore_range<W, I, false>(w, idx, saved, b, e, 0, runs);
  }
}

// Restore (apply == false) or apply entries [b, e) of one list entry, each index read from the list.
// `runs`: the entries are sorted (contiguous runs may be copied as blocks).
void run_listed(const Item& it, bool apply, int64_t b, int64_t e, bool runs) {
  if (it.mirror)  // 1-byte codes and their bf16 mirror, entry by entry
    return it.idx64 ? run_mirrored<int64_t>(it, apply, b, e) : run_mirrored<int32_t>(it, apply, b, e);
  if (is_code(it.wtype)) {
    if (apply)  // per-entry grid math (int8 lines of one row: a vectorized loop)
      return it.idx64 ? run_range_q<int64_t>(it, b, e, runs) : run_range_q<int32_t>(it, b, e, runs);
    return it.idx64 ? run_range<uint8_t, int64_t>(it, false, b, e, runs)  // a byte scatter
                    : run_range<uint8_t, int32_t>(it, false, b, e, runs);
  }
  switch (it.wtype) {
    case SHIRA_F32:
      return it.idx64 ? run_range<float, int64_t>(it, apply, b, e, runs)
                      : run_range<float, int32_t>(it, apply, b, e, runs);
    case SHIRA_F16:
      return it.idx64 ? run_range<Half, int64_t>(it, apply, b, e, runs)
                      : run_range<Half, int32_t>(it, apply, b, e, runs);
    case SHIRA_BF16:
      return it.idx64 ? run_range<BF16, int64_t>(it, apply, b, e, runs)
                      : run_range<BF16, int32_t>(it, apply, b, e, runs);
    default:
      throw std::logic_error("shira: unreachable weight dtype");
  }
}

// ---- described runs (shira_core.h, "Runs") ------------------------------------------------------

// A stretch is handled a 64-byte line at a time (loops of a constant count, which the compiler unrolls and
// vectorizes as it does the listed path's line copies), then the rest.
template <typename W>
void apply_stretch(W* __restrict__ w, W* __restrict__ saved, const float* __restrict__ delta, int64_t n) {
  constexpr int64_t L = kRun<W>;
  int64_t k = 0;
  for (; k + L <= n; k += L) {  // through local lines: the compiler then vectorizes the sums
    W old[L], out[L];
    std::memcpy(old, w + k, 64);
    for (int64_t j = 0; j < L; ++j) out[j] = from_float<W>(static_cast<float>(old[j]) + delta[k + j]);
    std::memcpy(saved + k, old, 64);
    std::memcpy(w + k, out, 64);
  }
  for (; k < n; ++k) {
    const W old = w[k];
    saved[k] = old;
    w[k] = from_float<W>(static_cast<float>(old) + delta[k]);
  }
}

inline void copy_stretch(char* __restrict__ dst, const char* __restrict__ src, int64_t bytes) {
  int64_t k = 0;
  for (; k + 64 <= bytes; k += 64) std::memcpy(dst + k, src + k, 64);
  if (k < bytes) std::memcpy(dst + k, src + k, static_cast<size_t>(bytes - k));
}

template <int F>
int64_t requantize_stretch(const Item& it, int64_t p, int64_t q, int64_t f) {
  uint8_t* w = reinterpret_cast<uint8_t*>(it.w);
  uint8_t* saved = static_cast<uint8_t*>(it.saved);
  int64_t clamped = 0;
  if constexpr (F == 0) {  // the vectorized loop, a line at a time, per row piece
    RowCursor rows{it.row_len};
    while (p < q) {
      const int64_t row = rows.at(f);
      const int64_t n = std::min(q - p, rows.hi - f);
      const float scale = it.scales[row];
      int64_t k = 0;
      for (; k + 64 <= n; k += 64) clamped += int8_run(w + f + k, saved + p + k, it.delta + p + k, scale, 64);
      if (k < n) clamped += int8_run(w + f + k, saved + p + k, it.delta + p + k, scale, n - k);
      p += n;
      f += n;
    }
  } else if constexpr (F == 3) {  // per piece of one row of the copy: consecutive columns, consecutive scales
    const DivBy cols(it.row_len);
    while (p < q) {
      int64_t r, c;
      cols.split(f, r, c);
      const int64_t n = std::min(q - p, it.row_len - c);
      const float* sc = it.scales + c;
      int64_t k = 0;
      for (; k + 64 <= n; k += 64) clamped += u8_run(w + f + k, saved + p + k, it.delta + p + k, sc + k, 64);
      if (k < n) clamped += u8_run(w + f + k, saved + p + k, it.delta + p + k, sc + k, n - k);
      p += n;
      f += n;
    }
  } else {
    const Codes<F>& table = codes<F>();
    RowCursor rows{it.row_len};
    for (; p < q; ++p, ++f) {
      const uint8_t old = w[f];
      saved[p] = old;
      w[f] = requantize<F>(table, old, it.scales[rows.at(f)], it.delta[p], clamped);
    }
  }
  return clamped;
}

// Entries [p, q) of one run, whose indices are f, f + 1, ...: one stretch of the weight.
void run_stretch(const Item& it, bool apply, int64_t p, int64_t q, int64_t f) {
  const int64_t n = q - p, ws = it.wsize;
  char* w = it.w + f * ws;
  char* saved = static_cast<char*>(it.saved) + p * ws;
  if (!apply) {
    copy_stretch(w, saved, n * ws);
    return;
  }
  if (it.codes) {  // baked codes: a swap
    copy_stretch(saved, w, n);
    copy_stretch(w, reinterpret_cast<const char*>(it.codes + p), n);
    return;
  }
  int64_t clamped = 0;
  switch (it.wtype) {
    case SHIRA_F32:
      return apply_stretch(reinterpret_cast<float*>(w), reinterpret_cast<float*>(saved), it.delta + p, n);
    case SHIRA_F16:
      return apply_stretch(reinterpret_cast<Half*>(w), reinterpret_cast<Half*>(saved), it.delta + p, n);
    case SHIRA_BF16:
      return apply_stretch(reinterpret_cast<BF16*>(w), reinterpret_cast<BF16*>(saved), it.delta + p, n);
    case SHIRA_I8:
      clamped = requantize_stretch<0>(it, p, q, f);
      break;
    case SHIRA_F8E4M3:
      clamped = requantize_stretch<1>(it, p, q, f);
      break;
    case SHIRA_F8E5M2:
      clamped = requantize_stretch<2>(it, p, q, f);
      break;
    case SHIRA_U8:
      clamped = requantize_stretch<3>(it, p, q, f);
      break;
    default:
      throw std::logic_error("shira: unreachable weight dtype");
  }
  if (clamped && it.saturated) __atomic_fetch_add(it.saturated, clamped, __ATOMIC_RELAXED);
}

// Entries [b, e) of one list entry: described runs from their description, the rest from the list (searched for
// runs of a line only where no description was given: a described list holds none beyond it).
void run_entries(const Item& it, bool apply, int64_t b, int64_t e, bool runs) {
  if (b >= e) return;
  runs = runs && !it.described;
  if (!it.runs || it.mirror || !g_runs.load(std::memory_order_relaxed)) return run_listed(it, apply, b, e, runs);
  const int64_t* R = it.runs;
  int64_t lo = 0, hi = it.n_runs;  // the first run that ends after b
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (R[3 * mid] + R[3 * mid + 2] <= b)
      lo = mid + 1;
    else
      hi = mid;
  }
  const int64_t pf = g_prefetch.load(std::memory_order_relaxed);
  const int64_t ahead = runs_ahead(pf, it.wsize);  // runs ahead whose first line is prefetched
  int64_t cur = b;
  for (int64_t r = lo; cur < e; ++r) {
    if (r >= it.n_runs || R[3 * r] >= e) {
      run_listed(it, apply, cur, e, runs);
      break;
    }
    const int64_t p = R[3 * r], f = R[3 * r + 1], n = R[3 * r + 2];
    if (cur < p) run_listed(it, apply, cur, p, runs);
    if (ahead && r + ahead < it.n_runs) __builtin_prefetch(it.w + R[3 * (r + ahead) + 1] * it.wsize, 1, 3);
    const int64_t s = std::max(p, cur), t = std::min(p + n, e);
    run_stretch(it, apply, s, t, f + (s - p));
    cur = t;
  }
}

// ---- a restore and an apply of one 1-byte weight, merged ----------------------------------------
// Random entries of two adapters on a 1-byte weight share lines: at 1% density a line of 64 codes holds an entry
// of one adapter about half the time (1 - 0.99^64), of both a quarter. Restoring a chunk and then applying it
// visits a shared line twice, the second time after the chunk's other lines went through the caches; here the
// restore takes kMerge entries at a time and the apply follows up to the restore's next index, so a line both
// touch is visited once, while it is in L1. The order per element is the fused plan's: every restore of an index
// before any apply of it (the apply stops short of the next restore's index). int8 random switches 1.06-1.17x
// faster at 1 M entries, 1.16x at 3e5; below g_merge_above (1e5 entries here) the merged loop lost 5-8% and is
// not taken; 16, 64 or 128 entries a step gained no more at 1 M (docs/kernels.md, "Merged passes"). Wider weights
// share few lines (16 fp32 per line: 2% of lines hold an entry of both, against 22% of int8 lines) and a plain
// loop gained nothing from it there, so they keep the two passes.
constexpr int64_t kMerge = 32;

// restore(i) for entries [i, r1) of the outgoing list and apply(j) for [j, a1) of the incoming one, in the order
// above; ahead_r(k) / ahead_a(k) prefetch entry k's lines, pf entries ahead (the index clamped to the last entry
// near the end, not tested per entry).
template <typename I, typename AR, typename R, typename AA, typename A>
void merged_entries(const I* __restrict__ ridx, int64_t i, int64_t r1, const I* __restrict__ aidx, int64_t j,
                    int64_t a1, int64_t pf, AR&& ahead_r, R&& restore, AA&& ahead_a, A&& apply) {
  const int64_t rlast = r1 - 1, alast = a1 - 1;
  while (i < r1) {
    for (const int64_t stop = std::min(r1, i + kMerge); i < stop; ++i) {
      if (pf > 0) ahead_r(std::min(i + pf, rlast));
      restore(i);
    }
    const int64_t bound = i < r1 ? static_cast<int64_t>(ridx[i]) : INT64_MAX;
    for (; j < a1 && aidx[j] < bound; ++j) {
      if (pf > 0) ahead_a(std::min(j + pf, alast));
      apply(j);
    }
  }
}

// Restore entries [r0, r1) of r and apply [a0, a1) of a, one weight (mergeable), merged.
template <int F, typename I, bool kU8T>
int64_t merged_mirrored(const Item& r, int64_t r0, int64_t r1, const Item& a, int64_t a0, int64_t a1, int64_t pf) {
  const Codes<F>& table = codes<F>();
  uint8_t* __restrict__ w = reinterpret_cast<uint8_t*>(a.w);
  uint16_t* __restrict__ m = static_cast<uint16_t*>(a.mirror);
  uint8_t* __restrict__ mt = static_cast<uint8_t*>(a.mirror);
  const I* ridx = static_cast<const I*>(r.idx);
  const I* aidx = static_cast<const I*>(a.idx);
  uint8_t* rsaved = static_cast<uint8_t*>(r.saved);
  uint8_t* asaved = static_cast<uint8_t*>(a.saved);
  RowCursor rows{a.row_len}, mrow{a.mcols}, rrows{r.row_len}, rmrow{r.mcols};
  int64_t clamped = 0;
  auto ahead = [&](const I* idx) {
    return [&, idx](int64_t k) {
      const int64_t jp = idx[k];
      __builtin_prefetch(w + jp, 1, 3);
      if constexpr (kU8T)
        __builtin_prefetch(mt + (jp % a.mcols) * a.mrows + jp / a.mcols, 1, 3);
      else
        __builtin_prefetch(m + jp, 1, 3);
    };
  };
  merged_entries(
      ridx, r0, r1, aidx, a0, a1, pf, ahead(ridx),
      [&](int64_t k) { mirrored_one<F, I, kU8T>(r, table, w, m, mt, ridx, rsaved, rrows, rmrow, false, k, clamped); },
      ahead(aidx),
      [&](int64_t k) { mirrored_one<F, I, kU8T>(a, table, w, m, mt, aidx, asaved, rows, mrow, true, k, clamped); });
  return clamped;
}

template <int F, typename I>
int64_t merged_q(const Item& r, int64_t r0, int64_t r1, const Item& a, int64_t a0, int64_t a1, int64_t pf) {
  if (a.mirror)
    return a.mirror_u8t ? merged_mirrored<F, I, true>(r, r0, r1, a, a0, a1, pf)
                        : merged_mirrored<F, I, false>(r, r0, r1, a, a0, a1, pf);
  uint8_t* __restrict__ w = reinterpret_cast<uint8_t*>(a.w);
  const I* __restrict__ ridx = static_cast<const I*>(r.idx);
  const I* __restrict__ aidx = static_cast<const I*>(a.idx);
  const uint8_t* __restrict__ rsaved = static_cast<const uint8_t*>(r.saved);
  uint8_t* __restrict__ asaved = static_cast<uint8_t*>(a.saved);
  auto ahead_r = [&](int64_t k) { __builtin_prefetch(w + ridx[k], 1, 3); };
  auto ahead_a = [&](int64_t k) { __builtin_prefetch(w + aidx[k], 1, 3); };
  auto restore = [&](int64_t k) { w[ridx[k]] = rsaved[k]; };
  if (a.codes) {  // baked codes: a swap
    const uint8_t* __restrict__ c = a.codes;
    merged_entries(ridx, r0, r1, aidx, a0, a1, pf, ahead_r, restore, ahead_a, [&](int64_t k) {
      uint8_t* q = w + aidx[k];
      asaved[k] = *q;
      *q = c[k];
    });
    return 0;
  }
  GridEntry<F, I> one{codes<F>(), w, aidx, a.delta, asaved, a.scales, RowCursor{a.row_len}};
  merged_entries(ridx, r0, r1, aidx, a0, a1, pf, ahead_r, restore, ahead_a, one);
  return one.clamped;
}

template <typename I>
void run_merged(const Item& r, int64_t r0, int64_t r1, const Item& a, int64_t a0, int64_t a1) {
  using Pass = int64_t (*)(const Item&, int64_t, int64_t, const Item&, int64_t, int64_t, int64_t);
  static constexpr Pass kPass[] = {merged_q<0, I>, merged_q<1, I>, merged_q<2, I>, merged_q<3, I>};  // F's order
  static_assert(SHIRA_F8E4M3 == SHIRA_I8 + 1 && SHIRA_F8E5M2 == SHIRA_I8 + 2 && SHIRA_U8 == SHIRA_I8 + 3);
  if (!is_code(a.wtype)) throw std::logic_error("shira: unreachable code dtype");
  const int64_t pf = short_distance(g_prefetch.load(std::memory_order_relaxed), std::min(r1 - r0, a1 - a0));
  const int64_t clamped = kPass[a.wtype - SHIRA_I8](r, r0, r1, a, a0, a1, pf);
  if (clamped && a.saturated) __atomic_fetch_add(a.saturated, clamped, __ATOMIC_RELAXED);
}

// ---- tasks and the thread pool -------------------------------------------------------------------

// A chunk: restore entries [r0, r1) of *r, then apply entries [a0, a1) of *a (either may be absent);
// `runs`: both lists are sorted. `second`: the mirror's second pass over those ranges of the items' orders.
struct Task {
  const Item* r;
  const Item* a;
  int64_t r0, r1, a0, a1;
  bool runs;
  bool second = false;
  bool merged = false;  // restore and apply run merged (mergeable, decided with the plan)
};

// Whether task t's restore and apply can run merged (run_merged): one 1-byte weight (and its mirror, if the pass
// writes one), both lists sorted (the fused plan) and visited entry by entry either way (a mirrored pass always;
// otherwise a described list with no run of a line, or no run copied at all). A deferred uint8 copy is written
// after, as before.
bool mergeable(const Task& t) {
  if (!t.r || !t.a || !t.runs || t.second || t.r0 >= t.r1 || t.a0 >= t.a1) return false;
  const Item &r = *t.r, &a = *t.a;
  if (r.w != a.w || r.wtype != a.wtype || !is_code(a.wtype) || r.idx64 != a.idx64 || r.mirror != a.mirror ||
      r.mirror_u8t != a.mirror_u8t)
    return false;
  const bool copies_runs = g_runs.load(std::memory_order_relaxed) != 0;
  auto listed = [&](const Item& it) { return !copies_runs || (it.described && it.n_runs == 0); };
  return a.mirror || (listed(r) && listed(a));
}

void run_task(const Task& t) {
  if (t.second) {
    for (const auto& [it, apply, b, e] : {std::make_tuple(t.r, false, t.r0, t.r1), std::make_tuple(t.a, true, t.a0, t.a1)})
      if (it && b < e) it->idx64 ? mirror_pass<int64_t>(*it, apply, b, e) : mirror_pass<int32_t>(*it, apply, b, e);
    return;
  }
  if (t.merged) {
    t.a->idx64 ? run_merged<int64_t>(*t.r, t.r0, t.r1, *t.a, t.a0, t.a1)
               : run_merged<int32_t>(*t.r, t.r0, t.r1, *t.a, t.a0, t.a1);
  } else {
    if (t.r) run_entries(*t.r, false, t.r0, t.r1, t.runs);
    if (t.a) run_entries(*t.a, true, t.a0, t.a1, t.runs);
  }
  if (t.a) {
    if (t.a->order && !t.a->codes && t.a0 < t.a1)  // baked codes are their own fresh codes
      t.a->idx64 ? gather_fresh<int64_t>(*t.a, t.a0, t.a1) : gather_fresh<int32_t>(*t.a, t.a0, t.a1);
  }
}

// A persistent pool: workers wait for a job (spinning briefly, then on a condition variable) and join it beside
// the caller while it is open. The caller takes every task nobody else took, then closes the job and waits only
// for the workers inside it: on a busy machine a worker that gets no CPU in time costs nothing (it finds the job
// closed when it wakes), where waiting for every worker to report cost a scheduler slice. One job at a time: a
// call that finds the pool busy (another thread's call) runs on its own thread. Rebuilt after fork() in the child
// (the parent's workers do not exist there).
class Pool {
 public:
  // Runs body() on the calling thread and on `workers - 1` pool threads; returns when all are done.
  // body must not throw.
  template <typename F>
  void run(int64_t workers, F&& body) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (workers <= 1 || !busy.owns_lock()) {
      body();
      return;
    }
    int64_t helpers = std::min<int64_t>(workers - 1, kMaxThreads);
    try {
      grow(helpers);
    } catch (...) {  // no thread to be had (a system limit): the threads that exist, or the caller alone. A call
      helpers = std::min<int64_t>(helpers, started_);  // never fails once it has written (callers rely on it)
      if (helpers == 0) {
        body();
        return;
      }
    }
    fn_ = [](void* ctx) { (*static_cast<F*>(ctx))(); };
    ctx_ = &body;
    limit_.store(helpers, std::memory_order_relaxed);
    state_.store(0, std::memory_order_release);  // open, nobody in it yet
    {
      std::lock_guard<std::mutex> lk(m_);
      gen_.fetch_add(1, std::memory_order_release);
    }
    work_.notify_all();
    body();  // takes every task no helper took: a helper that never got a CPU is not waited for
    // Closed from here: no helper joins any more; wait only for those inside (each holds at most one task).
    if ((state_.fetch_or(kClosed, std::memory_order_acq_rel) & kActive) == 0) return;
    for (int spin = 0; (state_.load(std::memory_order_acquire) & kActive) != 0; ++spin) {
      cpu_relax();
      if (spin > kSpin) {
        std::unique_lock<std::mutex> lk(m_);
        done_.wait(lk, [&] { return (state_.load(std::memory_order_acquire) & kActive) == 0; });
        break;
      }
    }
  }

  // Starts up to `helpers` workers now (a failure leaves fewer: run() then uses those that exist).
  void prepare(int64_t helpers) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return;  // another call runs a job: this one will run serially
    try {
      grow(std::min<int64_t>(helpers, kMaxThreads));
    } catch (...) {
    }
  }

 private:
  static constexpr int64_t kMaxThreads = 256;
  static constexpr int kSpin = 4000;  // polls before sleeping (some tens of microseconds)

  static inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }

  void grow(int64_t n) {
    while (static_cast<int64_t>(started_) < n) {
      const int64_t id = started_;
      const uint64_t seen = gen_.load(std::memory_order_acquire);  // the job about to be posted is new to it
      std::thread([this, id, seen] { loop(id, seen); }).detach();  // may throw: then it is not counted
      ++started_;
    }
  }

  void loop(int64_t /*id*/, uint64_t seen) {
    for (;;) {
      uint64_t g;
      for (int spin = 0; (g = gen_.load(std::memory_order_acquire)) == seen; ++spin) {
        cpu_relax();
        if (spin > kSpin) {
          std::unique_lock<std::mutex> lk(m_);
          work_.wait(lk, [&] { return gen_.load(std::memory_order_acquire) != seen; });
        }
      }
      seen = g;
      join();
    }
  }

  // Joins the open job if it still needs a helper: runs its body, leaves, wakes the caller if it was the last one
  // in a closed job. A helper that wakes late finds the job closed (or joins a newer one: fine either way).
  void join() {
    int64_t s = state_.load(std::memory_order_acquire);
    while ((s & kClosed) == 0) {
      if ((s & kActive) >= limit_.load(std::memory_order_relaxed)) return;  // enough helpers (a stale limit: the
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {  // CAS
        if ((s & kActive) < limit_.load(std::memory_order_acquire)) fn_(ctx_);  // of a newer job checks again)
        if (state_.fetch_sub(1, std::memory_order_acq_rel) - 1 == kClosed) {
          std::lock_guard<std::mutex> lk(m_);
          done_.notify_all();
        }
        return;
      }
    }
  }

  std::mutex busy_;  // held by the caller of the running job
  std::mutex m_;
  std::condition_variable work_, done_;
  // A job's state: kClosed once its caller finished its own part, plus how many helpers are inside it.
  static constexpr int64_t kClosed = int64_t{1} << 62, kActive = kClosed - 1;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int64_t> state_{kClosed};
  std::atomic<int64_t> limit_{0};  // helpers the open job takes
  void (*fn_)(void*) = nullptr;
  void* ctx_ = nullptr;
  int64_t started_ = 0;
};

std::atomic<Pool*> g_pool{nullptr};
std::once_flag g_atfork;

Pool& pool() {
  std::call_once(g_atfork, [] {
    pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr); });  // the child's pool starts afresh (leaked)
  });
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (!p) {
    static std::mutex make;
    std::lock_guard<std::mutex> lk(make);
    p = g_pool.load(std::memory_order_acquire);
    if (!p) {
      p = new Pool();
      g_pool.store(p, std::memory_order_release);
    }
  }
  return *p;
}

// Starts the pool's workers a call of `threads` may use (before its first write); a failure to start one is not an
// error (the call then uses those that exist).
void pool_ready(int64_t threads) { pool().prepare(threads - 1); }

// Runs every task; threaded (dynamic hand-out to up to `threads` threads) when `threaded`, else on the caller.
void run_tasks(const std::vector<Task>& tasks, bool threaded, int64_t threads) {
  if (tasks.empty()) return;
  if (!threaded || tasks.size() == 1) {
    for (const Task& t : tasks) run_task(t);
    return;
  }
  std::atomic<size_t> next{0};
  const int64_t workers = std::min<int64_t>(threads, static_cast<int64_t>(tasks.size()));
  pool().run(workers, [&] {
    for (size_t k; (k = next.fetch_add(1, std::memory_order_relaxed)) < tasks.size();) run_task(tasks[k]);
  });
}

// Chunks of one list entry by position (valid for any order: indices are unique within a list); `second`: of
// its mirror's second pass (positions in its order).
void chunk_by_position(const Item* it, bool apply, int64_t chunk, bool runs, std::vector<Task>& out,
                       bool second = false) {
  for (int64_t b = 0; b < it->n; b += chunk) {
    const int64_t e = std::min(it->n, b + chunk);
    out.push_back(apply ? Task{nullptr, it, 0, 0, b, e, runs, second} : Task{it, nullptr, b, e, 0, 0, runs, second});
  }
}

// The transposed position of entry order[k] of an item with a mirror order, and the first k in [lo, hi) whose
// position is >= value (positions ascend along the order).
int64_t tpos_at(const Item& it, int64_t k) {
  const int64_t p = it.idx64 ? static_cast<const int64_t*>(it.order)[k] : static_cast<const int32_t*>(it.order)[k];
  const int64_t j = index_at(it, p);
  return (j % it.mcols) * it.mrows + j / it.mcols;
}

int64_t lower_bound_tpos(const Item& it, int64_t lo, int64_t hi, int64_t value) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (tpos_at(it, mid) < value)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// Chunks of one weight by element range: restore r and apply a (sorted lists; either may be null). `second`: of
// their mirrors' second passes, cut by transposed position (their orders), so a chunk's apply rewrites the lines
// of the copy its restore just wrote.
void chunk_by_range(const Item* r, const Item* a, int64_t chunk, std::vector<Task>& out, bool second = false) {
  const int64_t nr = r ? r->n : 0, na = a ? a->n : 0;
  if (nr + na == 0) return;
  const int64_t pieces = (nr + na + chunk - 1) / chunk;
  // Cut points are taken from the longer list; the other list is cut at the same element.
  const bool cut_on_a = na >= nr;
  const Item* lead = cut_on_a ? a : r;
  const Item* other = cut_on_a ? r : a;
  const int64_t nl = cut_on_a ? na : nr, no = cut_on_a ? nr : na;
  int64_t l0 = 0, o0 = 0;
  for (int64_t k = 1; k <= pieces; ++k) {
    int64_t l1 = nl, o1 = no;
    if (k < pieces) {
      l1 = nl * k / pieces;
      if (l1 < nl && other)
        o1 = second ? lower_bound_tpos(*other, o0, no, tpos_at(*lead, l1))
                    : lower_bound_pos(*other, o0, no, index_at(*lead, l1));
    }
    if (l1 > l0 || o1 > o0) {
      if (cut_on_a)
        out.push_back(Task{r, a, o0, o1, l0, l1, true, second});
      else
        out.push_back(Task{r, a, l0, l1, o0, o1, true, second});
    }
    l0 = l1;
    o0 = o1;
  }
}

// ---- checks --------------------------------------------------------------------------------------

[[noreturn]] void fail_range(const char* op, const Item& it, int64_t value) {
  refuse("shira::", op, ": ", it.list, "tensor ", it.pos, ": index ", value, " out of range for ", it.numel,
         " elements");
}

inline bool out_of_range(int64_t v, int64_t numel) {
  return static_cast<uint64_t>(v) >= static_cast<uint64_t>(numel);
}

// Scans [b, e) of one list entry: any index out of range, any not above its predecessor.
template <typename I>
void scan(const I* idx, int64_t numel, int64_t b, int64_t e, bool& bad, bool& unsorted) {
  bool bd = false, us = false;
  int64_t prev = b > 0 ? static_cast<int64_t>(idx[b - 1]) : INT64_MIN;
  for (int64_t i = b; i < e; ++i) {
    const int64_t v = idx[i];
    bd |= out_of_range(v, numel);
    us |= v <= prev;
    prev = v;
  }
  bad = bd;
  unsorted = us;
}

// One run of an item's description: inside the list and the weight (and after the previous run: `end`).
void check_run(const char* op, const Item& it, int64_t r, int64_t end) {
  const int64_t p = it.runs[3 * r], f = it.runs[3 * r + 1], n = it.runs[3 * r + 2];
  const bool ok = n >= 1 && p >= end && p <= it.n - n && f >= 0 && f <= it.numel - n;
  if (ok) return;
  const std::string what = "run " + std::to_string(r) + " (position " + std::to_string(p) + ", first index " +
                           std::to_string(f) + ", length " + std::to_string(n) + ")";
  if (n < 1) refuse("shira::", op, ": ", it.list, "tensor ", it.pos, ": ", what, " is empty");
  if (p < end)
    refuse("shira::", op, ": ", it.list, "tensor ", it.pos, ": ", what, " overlaps the run before it, which ends at entry ",
           end);
  refuse("shira::", op, ": ", it.list, "tensor ", it.pos, ": ", what, " does not fit ", it.n,
         " entries of a weight of ", it.numel, " elements");
}

// Every run of an item against its index list.
template <typename I>
void check_runs_listed(const char* op, const Item& it) {
  const I* idx = static_cast<const I*>(it.idx);
  int64_t end = 0;
  for (int64_t r = 0; r < it.n_runs; ++r) {
    check_run(op, it, r, end);
    const int64_t p = it.runs[3 * r], f = it.runs[3 * r + 1], n = it.runs[3 * r + 2];
    for (int64_t k = 0; k < n; ++k)
      if (static_cast<int64_t>(idx[p + k]) != f + k)
        refuse("shira::", op, ": ", it.list, "tensor ", it.pos, ": run ", r, " says index ", f + k, " at entry ",
               p + k, ", the index list holds ", static_cast<int64_t>(idx[p + k]));
    end = p + n;
  }
}

// validate=True: every index in range (raises before any write) and returns whether all lists are sorted.
// validate=False: only the first and last index of each list (the caller guarantees sorted lists).
// Runs: every one against the list (validate), or the first and last one's bounds.
bool check_bounds(const char* op, const std::vector<Item>& items, bool validate, int64_t chunk, int64_t threads) {
  for (const Item& it : items) {
    if (!it.runs) continue;
    if (validate) {
      if (it.idx64)
        check_runs_listed<int64_t>(op, it);
      else
        check_runs_listed<int32_t>(op, it);
    } else {
      check_run(op, it, 0, 0);
      if (it.n_runs > 1) check_run(op, it, it.n_runs - 1, 0);
    }
  }
  if (!validate) {
    for (const Item& it : items) {
      if (it.n == 0) continue;
      const int64_t first = index_at(it, 0), last = index_at(it, it.n - 1);
      if (out_of_range(first, it.numel)) fail_range(op, it, first);
      if (out_of_range(last, it.numel)) fail_range(op, it, last);
    }
    return true;
  }
  struct Piece {
    int64_t item, b, e;
    bool bad, unsorted;
  };
  std::vector<Piece> pieces;
  int64_t total = 0;
  for (size_t k = 0; k < items.size(); ++k) {
    total += items[k].n;
    for (int64_t b = 0; b < items[k].n; b += 4 * chunk)
      pieces.push_back(Piece{static_cast<int64_t>(k), b, std::min(items[k].n, b + 4 * chunk), false, false});
  }
  auto run_piece = [&](Piece& p) {
    const Item& it = items[p.item];
    if (it.idx64)
      scan(static_cast<const int64_t*>(it.idx), it.numel, p.b, p.e, p.bad, p.unsorted);
    else
      scan(static_cast<const int32_t*>(it.idx), it.numel, p.b, p.e, p.bad, p.unsorted);
  };
  const bool threaded = total >= g_serial_below.load(std::memory_order_relaxed) && pieces.size() > 1 && threads > 1;
  if (threaded) {
    std::atomic<size_t> next{0};
    pool().run(std::min<int64_t>(threads, static_cast<int64_t>(pieces.size())), [&] {
      for (size_t k; (k = next.fetch_add(1, std::memory_order_relaxed)) < pieces.size();) run_piece(pieces[k]);
    });
  } else {
    for (Piece& p : pieces) run_piece(p);
  }
  bool sorted = true;
  for (const Piece& p : pieces) {
    if (p.bad) {  // the first bad piece in list order: name its first bad index
      const Item& it = items[p.item];
      for (int64_t i = p.b; i < p.e; ++i)
        if (out_of_range(index_at(it, i), it.numel)) fail_range(op, it, index_at(it, i));
    }
    sorted &= !p.unsorted;
  }
  return sorted;
}

// Every item's mirror order (after the index checks: positions are computed from the indices): with `validate`,
// each entry in range and the transposed positions strictly ascending (so it is a permutation: the indices of one
// item are distinct); without, the first and the last entry's range (the caller promises the rest).
template <typename I>
void check_order(const char* op, const Item& it, bool validate) {
  const I* order = static_cast<const I*>(it.order);
  const I* idx = static_cast<const I*>(it.idx);
  const int64_t n = it.n;
  auto fail = [&](int64_t k, int64_t p) {
    refuse("shira::", op, ": ", it.list, "tensor ", it.pos, ": mirror order entry ", k, " names entry ", p,
           ", out of range for ", n, " entries");
  };
  if (!validate) {
    for (int64_t k : {int64_t{0}, n - 1})
      if (out_of_range(order[k], n)) fail(k, order[k]);
    return;
  }
  const DivBy cols(it.mcols);
  int64_t prev = -1;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t p = order[k];
    if (out_of_range(p, n)) fail(k, p);
    int64_t r, c;
    cols.split(static_cast<int64_t>(idx[p]), r, c);
    const int64_t t = c * it.mrows + r;
    if (t <= prev)
      refuse("shira::", op, ": ", it.list, "tensor ", it.pos, ": mirror order entry ", k, " (entry ", p, ", index ",
             static_cast<int64_t>(idx[p]), ") is at transposed position ", t, ", not after the one before it (", prev,
             "): the order must sort the entries by column, then row, each once");
    prev = t;
  }
}

void check_orders(const char* op, const std::vector<Item>& items, bool validate) {
  for (const Item& it : items)
    if (it.order && it.n)
      it.idx64 ? check_order<int64_t>(op, it, validate) : check_order<int32_t>(op, it, validate);
}

// True when the weights of one list are pairwise disjoint in memory.
bool disjoint(const std::vector<const Item*>& items) {
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  for (const Item* it : items)
    if (it->nbytes) spans.emplace_back(reinterpret_cast<uintptr_t>(it->w), reinterpret_cast<uintptr_t>(it->w) + it->nbytes);
  std::sort(spans.begin(), spans.end());
  for (size_t k = 1; k < spans.size(); ++k)
    if (spans[k].first < spans[k - 1].second) return false;
  return true;
}

// ---- the engine shared by the three verbs --------------------------------------------------------

// Restores `outs`, then applies `ins` (either may be empty). All checks happen before the first write.
void run(const char* op, std::vector<Item> outs, std::vector<Item> ins, bool validate, int64_t threads) {
  std::vector<Item> all(outs);
  all.insert(all.end(), ins.begin(), ins.end());
  const int64_t chunk = std::max<int64_t>(1, g_chunk.load(std::memory_order_relaxed));
  const bool sorted = check_bounds(op, all, validate, chunk, threads);
  check_orders(op, all, validate);

  int64_t total = 0;
  for (const Item& it : all) total += it.n;
  const bool threaded = total >= g_serial_below.load(std::memory_order_relaxed) && threads > 1;

  // Pair every incoming weight with the outgoing entry of the same tensor, if any.
  std::vector<const Item*> out_ptrs, in_ptrs;
  for (const Item& it : outs) out_ptrs.push_back(&it);
  for (const Item& it : ins) in_ptrs.push_back(&it);
  bool ordered = !disjoint(out_ptrs) || !disjoint(in_ptrs);
  std::vector<const Item*> partner(ins.size(), nullptr);  // outgoing entry of the same weight
  std::vector<char> paired(outs.size(), 0);
  if (!ordered && !outs.empty() && !ins.empty()) {
    std::vector<std::pair<uintptr_t, size_t>> by_addr;  // outgoing weights by start address
    for (size_t k = 0; k < outs.size(); ++k)
      if (outs[k].nbytes) by_addr.emplace_back(reinterpret_cast<uintptr_t>(outs[k].w), k);
    std::sort(by_addr.begin(), by_addr.end());
    for (size_t j = 0; j < ins.size() && !ordered; ++j) {
      const Item& a = ins[j];
      if (!a.nbytes) continue;
      const uintptr_t lo = reinterpret_cast<uintptr_t>(a.w), hi = lo + a.nbytes;
      // the outgoing weight starting at or before `lo`, and the one after it, are the only candidates
      auto it = std::upper_bound(by_addr.begin(), by_addr.end(), std::make_pair(lo, SIZE_MAX));
      for (int side = 0; side < 2 && !ordered; ++side) {
        if (side == 0 && it == by_addr.begin()) continue;
        auto cand = side == 0 ? std::prev(it) : it;
        if (cand == by_addr.end()) continue;
        const Item& r = outs[cand->second];
        const uintptr_t rlo = reinterpret_cast<uintptr_t>(r.w), rhi = rlo + r.nbytes;
        if (rhi <= lo || hi <= rlo) continue;  // disjoint
        if (rlo == lo && r.nbytes == a.nbytes && r.wtype == a.wtype) {
          partner[j] = &r;
          paired[cand->second] = 1;
        } else {
          ordered = true;  // partial overlap or a reinterpretation: keep list order
        }
      }
    }
  }
  const int64_t force = g_force_plan.load(std::memory_order_relaxed);
  if (force == 2) ordered = true;
  const Plan plan = ordered ? kOrdered : (sorted && force != 1 ? kFused : kPhased);

  // Deferred mirrors: a restore and an apply of one weight (fused or phased plans: the second passes run after
  // every first pass, restores' before applies') defer theirs together or not at all; each apply's new codes get
  // a buffer (before the first write).
  auto inline_mirror = [](Item& it) {
    if (!it.order) return;
    it.mirror = it.later;
    it.order = nullptr;
    it.later = nullptr;
  };
  if (plan != kOrdered)
    for (size_t j = 0; j < ins.size(); ++j)
      if (const Item* r = partner[j]; r && (r->order != nullptr) != (ins[j].order != nullptr)) {
        inline_mirror(ins[j]);
        inline_mirror(outs[static_cast<size_t>(r - outs.data())]);
      }
  std::vector<std::unique_ptr<uint8_t[]>> fresh;
  for (Item& it : ins)
    if (it.order && !it.codes && it.n) {
      fresh.emplace_back(new uint8_t[static_cast<size_t>(it.n)]);
      it.fresh = fresh.back().get();
    }
  bool deferred = false;
  for (const Item& it : outs) deferred |= it.order != nullptr;
  for (const Item& it : ins) deferred |= it.order != nullptr;

  // Every task list is made before the first write: nothing below allocates (or throws) once writing began, so
  // a call that returns an error wrote nothing (the atomic switch of the runtime relies on it).
  std::vector<std::vector<Task>> phases;  // run one after another
  std::vector<char> phase_threaded;
  if (plan == kFused) {
    phases.emplace_back();
    for (size_t k = 0; k < outs.size(); ++k)
      if (!paired[k]) chunk_by_range(&outs[k], nullptr, chunk, phases.back());
    for (size_t j = 0; j < ins.size(); ++j) chunk_by_range(partner[j], &ins[j], chunk, phases.back());
    phase_threaded.push_back(threaded);
  } else if (plan == kPhased) {
    phases.resize(2);
    for (const Item& it : outs) chunk_by_position(&it, false, chunk, false, phases[0]);
    for (const Item& it : ins) chunk_by_position(&it, true, chunk, false, phases[1]);
    phase_threaded.assign(2, threaded);
  } else {
    for (const std::vector<Item>* list : {&outs, &ins})
      for (const Item& it : *list) {  // each one's second pass right after its first
        for (bool second : {false, true}) {
          if (second && !it.order) continue;
          phases.emplace_back();
          chunk_by_position(&it, it.apply, chunk, sorted, phases.back(), second);
          phase_threaded.push_back(threaded && it.n >= g_serial_below.load(std::memory_order_relaxed));
        }
      }
  }
  if (deferred && plan != kOrdered) {  // the second passes, a restore and an apply of one weight together
    phases.emplace_back();
    std::vector<char> merged(outs.size(), 0);
    for (size_t j = 0; j < ins.size(); ++j)
      if (ins[j].order && partner[j]) merged[static_cast<size_t>(partner[j] - outs.data())] = 1;
    for (size_t k = 0; k < outs.size(); ++k)
      if (outs[k].order && !merged[k]) chunk_by_range(&outs[k], nullptr, chunk, phases.back(), true);
    for (size_t j = 0; j < ins.size(); ++j)
      if (ins[j].order) chunk_by_range(partner[j] && partner[j]->order ? partner[j] : nullptr, &ins[j], chunk,
                                       phases.back(), true);
    phase_threaded.push_back(threaded);
  }
  // the bytes this call writes to: weights and their copies (a paired restore writes its partner's weight)
  int64_t footprint = 0;
  auto bytes = [](const Item& it) {
    const int64_t copy = it.mirror ? (it.mirror_u8t ? 1 : 2) : it.later ? 1 : 0;
    return static_cast<int64_t>(it.nbytes) + copy * it.numel;
  };
  for (const Item& it : ins) footprint += bytes(it);
  for (size_t k = 0; k < outs.size(); ++k)
    if (!paired[k]) footprint += bytes(outs[k]);
  bool merged = false;
  if (footprint >= g_merge_above.load(std::memory_order_relaxed))
    for (std::vector<Task>& phase : phases)
      for (Task& t : phase) merged |= (t.merged = mergeable(t));
  g_last_plan.store((threaded ? 1 : 0) | (static_cast<int64_t>(plan) << 1) | (merged ? 8 : 0),
                    std::memory_order_relaxed);
  if (threaded) pool_ready(threads);  // the pool's threads are started (or known unavailable) before any write
  for (size_t k = 0; k < phases.size(); ++k) run_tasks(phases[k], phase_threaded[k] != 0, threads);
}


// ---- items from the C ABI ------------------------------------------------------------------------

// A refusal's prefix: "shira::<op>: <list>tensor <t>: ".
struct Where {
  const char* op;
  const char* list;
  int64_t t;
};

inline std::ostream& operator<<(std::ostream& os, const Where& w) {
  return os << "shira::" << w.op << ": " << w.list << "tensor " << w.t << ": ";
}

// The Item of one list position, checking what raw pointers and codes can tell (the bindings check shapes,
// dtypes of their arrays and contiguity first, with their own names). `saturated`: this item's slot, or null.
Item make_item(const char* op, const char* list, int64_t t, const shira_item& s, bool apply, int64_t* saturated) {
  const Where where{op, list, t};  // written out only in a refusal (a string per item cost ~50 ns per call)
  const int32_t wt = s.dtype;
  if (wt < SHIRA_F32 || wt > SHIRA_U8)
    refuse(where, "weight dtype code ", wt, " is not one of fp32/fp16/bf16/int8/float8_e4m3fn/float8_e5m2/uint8");
  if (s.index_bits != 32 && s.index_bits != 64) refuse(where, "index_bits ", s.index_bits, " is not 32/64");
  if (s.numel < 0 || s.count < 0) refuse(where, "negative numel or count");
  if (s.count > 0 && (!s.indices || !s.saved || (apply && !s.delta) || !s.weight)) refuse(where, "null pointer");
  const bool baked = apply && s.delta_is_codes;
  if (baked && !is_code(wt)) refuse(where, "delta dtype ", dtype_name(wt), " is not float32");
  const bool has_scale = s.scales && s.n_scales > 0;
  if (!apply || baked) {
    // no grid math: scales, if given, are not used
  } else if (is_code(wt)) {
    if (!has_scale)
      refuse(where, "a ", dtype_name(wt), " weight needs its per-", wt == SHIRA_U8 ? "column" : "row", " scales");
    if (s.numel % s.n_scales)
      refuse(where, s.n_scales, " scales do not divide a weight of ", s.numel, " elements into ",
             wt == SHIRA_U8 ? "columns" : "rows");
  } else if (has_scale) {
    refuse(where, "scales given for a ", dtype_name(wt), " weight (only 1-byte quantized weights take scales)");
  }
  const size_t wsize = wt == SHIRA_F32 ? 4 : (wt == SHIRA_F16 || wt == SHIRA_BF16) ? 2 : 1;
  const bool has_mirror = s.mirror && s.mirror_kind != SHIRA_MIRROR_NONE;
  const bool u8t = has_mirror && s.mirror_kind == SHIRA_MIRROR_U8T;
  size_t mbytes = 0;
  if (has_mirror) {
    if (wt == SHIRA_U8) refuse(where, "a mirror given for a uint8 weight (it is the copy itself: no mirror)");
    if (!is_code(wt))
      refuse(where, "a mirror given for a ", dtype_name(wt), " weight (only 1-byte codes have a bf16 mirror)");
    if (s.mirror_kind == SHIRA_MIRROR_BF16) {
      mbytes = 2 * static_cast<size_t>(s.numel);
    } else if (u8t) {
      if (wt != SHIRA_I8 || s.rows < 0 || s.cols < 0 || s.rows * s.cols != s.numel)
        refuse(where, "a uint8 mirror is the transposed copy of 2-D int8 codes: rows ", s.rows, " x cols ", s.cols,
               " for a ", dtype_name(wt), " weight of ", s.numel, " elements");
      mbytes = static_cast<size_t>(s.numel);
    } else {
      refuse(where, "mirror kind ", s.mirror_kind, " is not 0/1/2");
    }
    const auto* mlo = static_cast<const char*>(s.mirror);
    const auto* wlo = static_cast<const char*>(s.weight);
    if (!(mlo + mbytes <= wlo || wlo + s.numel * wsize <= mlo)) refuse(where, "the mirror overlaps its weight");
  }
  Item item{};
  item.w = static_cast<char*>(s.weight);
  item.numel = s.numel;
  item.nbytes = static_cast<size_t>(s.numel) * wsize;
  item.wtype = wt;
  item.idx = s.indices;
  item.idx64 = s.index_bits == 64;
  item.n = s.count;
  item.delta = apply && !baked ? static_cast<const float*>(s.delta) : nullptr;
  item.codes = baked ? static_cast<const uint8_t*>(s.delta) : nullptr;
  item.apply = apply;
  item.saved = s.saved;
  item.pos = t;
  item.list = list;
  item.mirror = has_mirror ? s.mirror : nullptr;
  item.mirror_u8t = u8t;
  if (s.mirror_order && s.count > 0) {
    if (!u8t)
      refuse(where, "a mirror order given without a uint8 mirror (it orders the transposed copy's second pass)");
    item.order = s.mirror_order;
    item.later = static_cast<uint8_t*>(s.mirror);
    item.mirror = nullptr;
    item.fresh = baked ? static_cast<const uint8_t*>(s.delta) : nullptr;
  }
  item.mrows = u8t ? s.rows : 0;
  item.mcols = u8t ? s.cols : 0;
  if (s.n_runs < 0) refuse(where, "negative n_runs ", s.n_runs);
  if (s.n_runs > 0 && !s.runs) refuse(where, s.n_runs, " runs and a null runs pointer");
  item.runs = s.n_runs > 0 ? s.runs : nullptr;
  item.n_runs = s.n_runs;
  item.described = s.runs != nullptr;
  item.wsize = static_cast<int64_t>(wsize);
  if (apply && is_code(wt) && !baked) {
    item.scales = s.scales;
    item.row_len = wt == SHIRA_U8 ? s.n_scales : s.numel / s.n_scales;
    item.saturated = saturated;
  }
  return item;
}

std::vector<Item> make_items(const char* op, const char* list, const shira_item* items, int64_t n, bool apply,
                             int64_t* saturated) {
  if (n < 0 || (n > 0 && !items)) refuse("shira::", op, ": ", list, "bad list (", n, " items)");
  std::vector<Item> out;
  out.reserve(static_cast<size_t>(n));
  for (int64_t t = 0; t < n; ++t)
    out.push_back(make_item(op, list, t, items[t], apply, saturated && apply ? saturated + t : nullptr));
  return out;
}

inline int64_t thread_count(int32_t threads) {
  if (threads > 0) return threads;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw ? static_cast<int64_t>(hw) : 1;
}

// Runs one verb; turns every exception into a return code and a message.
template <typename F>
int guarded(char* err, int64_t errlen, F&& body) {
  auto put = [&](const char* msg) {
    if (err && errlen > 0) {
      std::strncpy(err, msg, static_cast<size_t>(errlen - 1));
      err[errlen - 1] = '\0';
    }
  };
  try {
    body();
    return 0;
  } catch (const InputError& e) {
    put(e.what());
    return 1;
  } catch (const std::exception& e) {
    put(e.what());
    return 2;
  } catch (...) {
    put("shira: unknown internal error");
    return 2;
  }
}

}  // namespace
}  // namespace shira

SHIRA_API int shira_restore(const shira_item* items, int64_t n_items, int32_t validate, int32_t threads, char* err,
                            int64_t errlen) {
  return shira::guarded(err, errlen, [&] {
    shira::run("restore_", shira::make_items("restore_", "", items, n_items, false, nullptr), {}, validate != 0,
               shira::thread_count(threads));
  });
}

SHIRA_API int shira_apply(const shira_item* items, int64_t n_items, int64_t* saturated, int32_t validate,
                          int32_t threads, char* err, int64_t errlen) {
  return shira::guarded(err, errlen, [&] {
    shira::run("apply_", {}, shira::make_items("apply_", "", items, n_items, true, saturated), validate != 0,
               shira::thread_count(threads));
  });
}

SHIRA_API int shira_switch(const shira_item* outs, int64_t n_outs, const shira_item* ins, int64_t n_ins,
                           int64_t* saturated, int32_t validate, int32_t threads, char* err, int64_t errlen) {
  return shira::guarded(err, errlen, [&] {
    auto o = shira::make_items("switch_", "outgoing ", outs, n_outs, false, nullptr);
    auto i = shira::make_items("switch_", "incoming ", ins, n_ins, true, saturated);
    shira::run("switch_", std::move(o), std::move(i), validate != 0, shira::thread_count(threads));
  });
}

SHIRA_API void shira_tuning(int64_t chunk, int64_t serial_below, int64_t force_plan, int64_t prefetch, int64_t runs,
                            int64_t* current) {
  if (chunk >= 0) shira::g_chunk.store(std::max<int64_t>(1, chunk));
  if (serial_below >= 0) shira::g_serial_below.store(serial_below);
  if (force_plan >= 0) shira::g_force_plan.store(force_plan);
  if (prefetch >= 0) shira::g_prefetch.store(prefetch);
  if (runs >= 0) shira::g_runs.store(runs ? 1 : 0);
  current[0] = shira::g_chunk.load();
  current[1] = shira::g_serial_below.load();
  current[2] = shira::g_force_plan.load();
  current[3] = shira::g_prefetch.load();
  current[4] = shira::g_last_plan.load();
  current[5] = shira::g_runs.load();
}

SHIRA_API int64_t shira_merge_above(int64_t bytes) {
  if (bytes >= 0) shira::g_merge_above.store(bytes);
  return shira::g_merge_above.load();
}

SHIRA_API int32_t shira_abi_version(void) { return SHIRA_ABI_VERSION; }

SHIRA_API int64_t shira_item_size(void) { return static_cast<int64_t>(sizeof(shira_item)); }

SHIRA_API const char* shira_source_id(void) { return SHIRA_SOURCE_ID; }
