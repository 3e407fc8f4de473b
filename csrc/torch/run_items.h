// run_items.h -- dynamic scheduling of C kernel work items over ATen's thread pool.
//
// at::get_num_threads() workers pull items from an atomic counter, each with its own scratch buffer,
// so torch.set_num_threads is respected and uneven items (causal attention: later queries see more
// keys) balance. Results never depend on the schedule when every item owns the outputs it writes.
//
// Nor on set_isa: every CPU op holds isa_mutex() shared for its whole call (IsaCall), and set_isa
// holds it exclusively, so a switch of instruction set waits for the running calls and never lands
// inside one (each result is the result of one instruction set).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <shared_mutex>

#include "../msattn.h"

namespace msattn {

inline std::shared_mutex &isa_mutex() {
    static std::shared_mutex m;
    return m;
}
using IsaCall = std::shared_lock<std::shared_mutex>;

// run f(order(w), scratch) for every w in [0, n): order maps the pull sequence to item numbers
// (heaviest first); f returns an MSATTN_* status
template <class Order, class F>
void run_items_dynamic(int64_t n, size_t scratch_bytes, Order order, F f, const char *what) {
    if (n <= 0) return;
    std::atomic<int64_t> next{0};
    std::atomic<int> status{MSATTN_OK};
    const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
    at::parallel_for(0, workers, 1, [&](int64_t b, int64_t e) {
        at::Tensor scratch = at::empty({(int64_t)scratch_bytes + 64}, at::kByte);
        for (int64_t t = b; t < e; ++t) {
            for (int64_t w = next.fetch_add(1); w < n; w = next.fetch_add(1)) {
                const int s = f(order(w), scratch.data_ptr());
                if (s != MSATTN_OK) status = s;
            }
        }
    });
    TORCH_CHECK(status.load() == MSATTN_OK, "msattn: ", what, " kernel failed with status ", status.load());
}

}  // namespace msattn
