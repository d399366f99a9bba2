// The plain loop that benchmarks.line_visits times: visit listed 64-byte lines in the listed order, each once, by
// adding to one byte of it (its first byte in the weight) (a read for ownership and a dirty write-back: the traffic a switch pays per
// weight line), on `threads` threads that split every segment evenly, with a software prefetch `prefetch` lines
// ahead (0: none). No adapter arrays are read: what is left is what the memory system charges for these lines
// in this order. Adding `add` and then `256 - add` leaves every byte as it was.
#include <cstdint>
#include <thread>
#include <vector>

struct segment {
  uint8_t* base;           // the weight's first byte
  const int64_t* offsets;  // one byte offset from base per line, in visiting order
  int64_t count;
};

static void visit(const segment* segs, int64_t n_segs, int part, int parts, int64_t prefetch, uint8_t add) {
  for (int64_t s = 0; s < n_segs; ++s) {
    uint8_t* base = segs[s].base;
    const int64_t* offsets = segs[s].offsets;
    const int64_t lo = segs[s].count * part / parts, hi = segs[s].count * (part + 1) / parts;
    for (int64_t i = lo; i < hi; ++i) {
      if (prefetch > 0 && i + prefetch < hi) __builtin_prefetch(base + offsets[i + prefetch], 1, 0);
      base[offsets[i]] += add;
    }
  }
}

extern "C" __attribute__((visibility("default"))) void shira_line_visits(const segment* segs, int64_t n_segs,
                                                                         int32_t threads, int64_t prefetch,
                                                                         int32_t add) {
  if (threads < 1) threads = 1;
  std::vector<std::thread> others;
  for (int t = 1; t < threads; ++t)
    others.emplace_back(visit, segs, n_segs, t, threads, prefetch, static_cast<uint8_t>(add));
  visit(segs, n_segs, 0, threads, prefetch, static_cast<uint8_t>(add));
  for (auto& t : others) t.join();
}
