// Trident sample-index math (pybind11 module engine.data._index_cpp).
//
// Pure index math over numpy arrays: no file I/O, no Python objects beyond arrays. Every function has a
// numpy reference in engine/data/index_reference.py and tests assert the outputs are identical.
//
//   shuffle_int32 / shuffle_int64   in-place Fisher-Yates driven by a counter-based hash (splitmix64),
//                                   so the permutation depends only on (n, key), never on thread count.
//   build_sample_idx_int32 / _int64 pack documents (in doc_idx order) into samples of seq_len + 1 tokens;
//                                   row i = (position in doc_idx, offset) of stream token i * seq_len, the
//                                   first token of sample i and the last of sample i - 1 (Megatron-LM's
//                                   sample_idx layout; row 0 is (0, 0)).
//   build_blend_idx                 weighted interleaving: sample k of dataset d sits at virtual time
//                                   (k + 0.5) / w[d]; the blend is the merge of all datasets by
//                                   (time, d). Proportions stay within one sample of N * w[d].

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

template <typename T>
void shuffle(py::array_t<T, py::array::c_style> arr, uint64_t key) {
  if (arr.ndim() != 1) throw std::invalid_argument("shuffle: array must be 1-D");
  auto a = arr.template mutable_unchecked<1>();
  const int64_t n = a.shape(0);
  py::gil_scoped_release release;
  // Draw i uses only (key, i): j = mix64(key + i * golden) % (i + 1), for i = n-1 .. 1.
  for (int64_t i = n - 1; i > 0; --i) {
    const uint64_t r = mix64(key + static_cast<uint64_t>(i) * kGolden);
    const int64_t j = static_cast<int64_t>(r % static_cast<uint64_t>(i + 1));
    std::swap(a(i), a(j));
  }
}

// Emits rows for samples [first, last] whose start token lies in documents [doc_begin, doc_end) of
// doc_idx, given that doc_begin starts at stream token `cursor`. Row i is stored at out[2 * i].
template <typename T>
void pack_range(const int32_t* sizes, const T* doc_idx, int64_t doc_begin, int64_t doc_end, int64_t cursor,
                int64_t first, int64_t last, int64_t seq_len, T* out) {
  int64_t i = first;
  int64_t target = i * seq_len;  // stream position of the token row i points at
  for (int64_t p = doc_begin; p < doc_end && i <= last; ++p) {
    const int64_t len = sizes[doc_idx[p]];
    const int64_t end = cursor + len;
    while (target < end && i <= last) {
      out[2 * i] = static_cast<T>(p);
      out[2 * i + 1] = static_cast<T>(target - cursor);
      ++i;
      target += seq_len;
    }
    cursor = end;
  }
  if (i <= last) throw std::runtime_error("build_sample_idx: documents hold fewer tokens than num_samples needs");
}

template <typename T>
py::array_t<T> build_sample_idx(py::array_t<int32_t, py::array::c_style | py::array::forcecast> sizes_arr,
                                py::array_t<T, py::array::c_style | py::array::forcecast> doc_idx_arr,
                                int64_t seq_len, int64_t num_samples, int num_threads) {
  if (seq_len < 1) throw std::invalid_argument("build_sample_idx: seq_len must be >= 1");
  if (num_samples < 0) throw std::invalid_argument("build_sample_idx: num_samples must be >= 0");
  const int32_t* sizes = sizes_arr.data();
  const T* doc_idx = doc_idx_arr.data();
  const int64_t n_docs = doc_idx_arr.shape(0);
  const int64_t n_sizes = sizes_arr.shape(0);
  py::array_t<T> result({num_samples + 1, static_cast<int64_t>(2)});
  T* out = result.mutable_data();
  {
    py::gil_scoped_release release;
    for (int64_t p = 0; p < n_docs; ++p) {
      if (doc_idx[p] < 0 || static_cast<int64_t>(doc_idx[p]) >= n_sizes)
        throw std::out_of_range("build_sample_idx: doc_idx holds an id outside sizes");
    }
    out[0] = 0;
    out[1] = 0;
    // Row i (i >= 1) is the document holding stream token i * seq_len. Split the documents into
    // contiguous chunks, one per thread: pass 1 sums each chunk's tokens, pass 2 lets each thread emit
    // the rows whose token falls inside its chunk. Output is identical for any thread count.
    int threads = num_threads > 0 ? num_threads : static_cast<int>(std::thread::hardware_concurrency());
    threads = std::max(1, std::min<int>(threads, 64));
    if (n_docs < (1 << 15)) threads = 1;
    std::vector<int64_t> bounds(threads + 1), totals(threads, 0);
    for (int t = 0; t <= threads; ++t) bounds[t] = n_docs * t / threads;
    auto sum_chunk = [&](int t) {
      int64_t s = 0;
      for (int64_t p = bounds[t]; p < bounds[t + 1]; ++p) s += sizes[doc_idx[p]];
      totals[t] = s;
    };
    std::vector<int64_t> starts(threads + 1, 0);
    if (threads > 1) {
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t) pool.emplace_back(sum_chunk, t);
      for (auto& th : pool) th.join();
      for (int t = 0; t < threads; ++t) starts[t + 1] = starts[t] + totals[t];
    } else {
      starts[1] = std::numeric_limits<int64_t>::max() / 2;  // one chunk: no need to sum it first
    }
    std::vector<std::exception_ptr> errors(threads);
    auto emit_chunk = [&](int t) {
      try {
        // Rows i >= 1 whose token i * seq_len lies in [starts[t], starts[t + 1]).
        const int64_t first = std::max<int64_t>(1, (starts[t] + seq_len - 1) / seq_len);
        const int64_t last = std::min<int64_t>(num_samples, (starts[t + 1] + seq_len - 1) / seq_len - 1);
        if (first <= last)
          pack_range<T>(sizes, doc_idx, bounds[t], bounds[t + 1], starts[t], first, last, seq_len, out);
      } catch (...) {
        errors[t] = std::current_exception();
      }
    };
    if (threads > 1) {
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t) pool.emplace_back(emit_chunk, t);
      for (auto& th : pool) th.join();
      // A sample beyond the last chunk means the documents ran out of tokens.
      if (num_samples * seq_len >= starts[threads] && num_samples > 0)
        throw std::runtime_error("build_sample_idx: documents hold fewer tokens than num_samples needs");
    } else {
      emit_chunk(0);
    }
    for (auto& e : errors)
      if (e) std::rethrow_exception(e);
  }
  return result;
}

py::tuple build_blend_idx(py::array_t<double, py::array::c_style | py::array::forcecast> weights_arr,
                          int64_t num_samples) {
  const int64_t n_sets = weights_arr.shape(0);
  if (n_sets < 1 || n_sets > 32767) throw std::invalid_argument("build_blend_idx: need 1..32767 datasets");
  if (num_samples < 0) throw std::invalid_argument("build_blend_idx: num_samples must be >= 0");
  const double* w = weights_arr.data();
  bool any_positive = false;
  for (int64_t d = 0; d < n_sets; ++d) {
    if (!(w[d] >= 0.0)) throw std::invalid_argument("build_blend_idx: weights must be >= 0");
    any_positive = any_positive || w[d] > 0.0;
  }
  if (!any_positive) throw std::invalid_argument("build_blend_idx: at least one weight must be > 0");
  py::array_t<int16_t> dataset_index(num_samples);
  py::array_t<int64_t> sample_index(num_samples);
  int16_t* di = dataset_index.mutable_data();
  int64_t* si = sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> counts(n_sets, 0);
    std::vector<double> next_time(n_sets);
    const double inf = std::numeric_limits<double>::infinity();
    for (int64_t d = 0; d < n_sets; ++d) next_time[d] = w[d] > 0.0 ? 0.5 / w[d] : inf;
    for (int64_t i = 0; i < num_samples; ++i) {
      int64_t best = 0;
      for (int64_t d = 1; d < n_sets; ++d)
        if (next_time[d] < next_time[best]) best = d;  // strict: the lowest d wins ties
      di[i] = static_cast<int16_t>(best);
      si[i] = counts[best];
      ++counts[best];
      next_time[best] = (static_cast<double>(counts[best]) + 0.5) / w[best];
    }
  }
  return py::make_tuple(dataset_index, sample_index);
}

}  // namespace

PYBIND11_MODULE(_index_cpp, m) {
  m.doc() = "Trident sample-index math: shuffles, packing and blending (see engine/data/sample_index.py)";
  m.def("shuffle_int32", &shuffle<int32_t>, py::arg("array"), py::arg("key"));
  m.def("shuffle_int64", &shuffle<int64_t>, py::arg("array"), py::arg("key"));
  m.def("build_sample_idx_int32", &build_sample_idx<int32_t>, py::arg("sizes"), py::arg("doc_idx"),
        py::arg("seq_len"), py::arg("num_samples"), py::arg("num_threads") = 0);
  m.def("build_sample_idx_int64", &build_sample_idx<int64_t>, py::arg("sizes"), py::arg("doc_idx"),
        py::arg("seq_len"), py::arg("num_samples"), py::arg("num_threads") = 0);
  m.def("build_blend_idx", &build_blend_idx, py::arg("weights"), py::arg("num_samples"));
}
