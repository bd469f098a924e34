// Runs the selected merge over every (layer, KV head) of a stream; GRKV's
// safeguard chooses one candidate per layer by the summed objective.
#include <algorithm>
#include <cmath>
#include <exception>
#include <mutex>

#include "grkv/select.h"
#include <numeric>

#include "grkv/common.h"
#include "grkv/compress.h"
#include "grkv/softcap.h"
#include "../gemm.h"
#include "../softmax.h"

namespace grkv {

namespace {

GrkvProblem build_problem(const HeadKV & h, int kv_head, int G, const LayerSurrogate & sq, const ModelShape & shape,
                          const std::vector<uint8_t> & mut) {
    const int d = h.d, n_q = (int) sq.qpos.size();
    GrkvProblem p;
    p.R = G * n_q;
    p.B = h.B;
    p.d = d;
    p.scale = shape.scale;
    p.softcap = shape.softcap;
    const int n_head = shape.n_head;
    p.q.resize((size_t) p.R * d);
    p.w.assign(p.R, sq.weight);
    p.vis.assign((size_t) p.R * h.B, 1);
    p.ostar.assign((size_t) p.R * d, 0.0f);
    p.k0.resize((size_t) h.B * d);
    p.v0.resize((size_t) h.B * d);
    p.mut = mut;
    for (int s = 0; s < h.B; ++s) {
        for (int e = 0; e < d; ++e) {
            p.k0[(size_t) s * d + e] = h.kv(h.keep[s], e, true);
            p.v0[(size_t) s * d + e] = h.kv(h.keep[s], e, false);
        }
    }
    // The teacher: every surrogate row's attention over the head's full cache,
    // as two products around a float softmax (O* = softmax(q K^T) V).
    std::vector<float> Kt((size_t) d * h.T), Vh((size_t) h.T * d);
    for (int t = 0; t < h.T; ++t) {
        for (int e = 0; e < d; ++e) {
            Kt[(size_t) e * h.T + t] = h.kv(t, e, true);
            Vh[(size_t) t * d + e] = h.kv(t, e, false);
        }
    }
    for (int g = 0; g < G; ++g) {
        for (int j = 0; j < n_q; ++j) {
            const int r = g * n_q + j;
            const float * q = sq.q.data() + ((size_t) j * n_head + (size_t) kv_head * G + g) * d;
            std::copy(q, q + d, p.q.begin() + (size_t) r * d);
        }
    }
    std::vector<float> A((size_t) p.R * h.T);
    gemm(p.R, h.T, d, p.q.data(), d, 1, Kt.data(), A.data());
    for (int r = 0; r < p.R; ++r) {
        const int j = r % n_q;
        // positions ascend: the row sees a prefix of the cache
        const int n_vis = sq.causal ? (int) (std::upper_bound(h.pos, h.pos + h.T, sq.qpos[j]) - h.pos) : h.T;
        float * a = A.data() + (size_t) r * h.T;
        if (shape.softcap > 0) {
            for (int t = 0; t < n_vis; ++t) a[t] = soft_cap(a[t] * shape.scale, shape.softcap);
            softmax_row(a, n_vis, 1.0f);
        } else {
            softmax_row(a, n_vis, shape.scale);
        }
        std::fill(a + n_vis, a + h.T, 0.0f);
        if (sq.causal) {
            for (int s = 0; s < h.B; ++s) p.vis[(size_t) r * h.B + s] = h.pos[h.keep[s]] <= sq.qpos[j];
        }
    }
    gemm(p.R, d, h.T, A.data(), h.T, 1, Vh.data(), p.ostar.data());
    return p;
}

}  // namespace

void merge_layers(const StreamView & view, const std::vector<int32_t> & keep, int n_head_kv, int budget,
                  const std::vector<Scores> & scores, const CompressRequest & req, std::vector<float> & new_k,
                  std::vector<float> & new_v, MergeReport & rep) {
    const Stream & st = *view.s;
    const int L = (int) st.k.size(), T = view.n_tokens();
    const size_t wk = st.k[0].n_embd, wv = st.v[0].n_embd;
    if (wk != wv) throw Error("merging needs equal K and V widths");
    const int d = (int) wk / n_head_kv;
    const auto & mp = req.merge;
    const bool grkv = mp.name == "grkv";
    if (mp.name != "merge" && mp.name != "pivot" && mp.name != "weighted" && !grkv) {
        throw Error("unknown merge '" + mp.name + "' (none, merge, pivot, weighted, grkv)");
    }
    if (grkv && (int) req.surrogate.size() != L) throw Error("GRKV needs surrogate queries for every cache layer");
    new_k.assign((size_t) L * budget * wk, 0.0f);
    new_v.assign((size_t) L * budget * wv, 0.0f);
    rep.choice.assign(L, 0);
    rep.obj_none.assign(L, 0);
    rep.obj_v.assign(L, 0);
    rep.obj_kv.assign(L, 0);
    rep.n_mutable.assign(L, 0);
    const std::vector<int32_t> pos = view.positions();
    std::exception_ptr err;
    std::mutex mu;
    const int G = req.shape.n_head / n_head_kv;
#pragma omp parallel for schedule(dynamic) num_threads(req.n_threads > 0 ? req.n_threads : 1)
    for (int l = 0; l < L; ++l) {
        try {
            const std::vector<float> K = view.keys(l), V = view.values(l);
            GrkvTiming timing;
            std::vector<GrkvResult> fits;
            std::vector<std::vector<float>> outk(n_head_kv), outv(n_head_kv);
            for (int h = 0; h < n_head_kv; ++h) {
                HeadKV hk;
                hk.k = K.data();
                hk.v = V.data();
                hk.T = T;
                hk.d = d;
                hk.stride = wk;
                hk.offset = (size_t) h * d;
                hk.pos = pos.data();
                hk.keep = keep.data() + ((size_t) l * n_head_kv + h) * budget;
                hk.B = budget;
                outk[h].resize((size_t) budget * d);
                outv[h].resize((size_t) budget * d);
                if (mp.name == "merge") {
                    merge_values(hk, outk[h].data(), outv[h].data());
                } else if (!grkv) {
                    merge_nearest(hk, mp.name == "weighted", outk[h].data(), outv[h].data());
                } else {
                    // fixed: the observation window and the top `guard` of the kept prefix by score
                    std::vector<uint8_t> mut(budget, 1);
                    std::vector<int> prefix;
                    for (int s = 0; s < budget; ++s) {
                        if (pos[hk.keep[s]] >= req.window_start) mut[s] = 0;
                        else prefix.push_back(s);
                    }
                    const int n_anchor = (int) (mp.guard * prefix.size());
                    const float * sc = scores[l].s.data() + (size_t) h * T;
                    std::partial_sort(prefix.begin(), prefix.begin() + n_anchor, prefix.end(), [&](int a, int b) {
                        return sc[hk.keep[a]] > sc[hk.keep[b]];
                    });
                    for (int i = 0; i < n_anchor; ++i) mut[prefix[i]] = 0;
                    GrkvParams gp = mp.grkv;
                    gp.codec_k = row_codec(st, l, true);
                    gp.codec_v = row_codec(st, l, false);
                    Stopwatch sw(&timing);
                    const GrkvProblem p = build_problem(hk, h, G, req.surrogate[l], req.shape, mut);
                    sw.lap(&GrkvTiming::teacher_s);
                    fits.push_back(grkv_fit(p, gp, &timing));
                    rep.n_mutable[l] += (int) std::count(mut.begin(), mut.end(), 1);
                }
            }
            if (grkv) {  // per-layer safeguard over the candidates, objectives summed over heads
                const size_t nc = fits[0].cand_obj.size();
                std::vector<double> tot(nc, 0.0);
                for (const auto & f : fits) for (size_t c = 0; c < nc; ++c) tot[c] += f.cand_obj[c];
                const int best = (int) (std::min_element(tot.begin(), tot.end()) - tot.begin());
                rep.choice[l] = best;
                for (const auto & f : fits) {
                    rep.obj_none[l] += f.obj_none;
                    rep.obj_v[l] += f.obj_v;
                    rep.obj_kv[l] += f.obj_kv;
                }
                for (int h = 0; h < n_head_kv; ++h) {
                    outk[h] = fits[h].cand_k[best];
                    outv[h] = fits[h].cand_v[best];
                }
                std::lock_guard<std::mutex> lk(mu);
                rep.timing += timing;
            }
            for (int h = 0; h < n_head_kv; ++h) {
                for (int s = 0; s < budget; ++s) {
                    std::copy(outk[h].begin() + (size_t) s * d, outk[h].begin() + (size_t) (s + 1) * d,
                              new_k.begin() + ((size_t) l * budget + s) * wk + (size_t) h * d);
                    std::copy(outv[h].begin() + (size_t) s * d, outv[h].begin() + (size_t) (s + 1) * d,
                              new_v.begin() + ((size_t) l * budget + s) * wv + (size_t) h * d);
                }
            }
        } catch (...) {
            std::lock_guard<std::mutex> lk(mu);
            if (!err) err = std::current_exception();
        }
    }
    if (err) std::rethrow_exception(err);
}

CompressOutcome compress_stream(Stream & st, const CompressRequest & req) {
    CompressOutcome out;
    StreamView view(st);
    const int L = (int) st.k.size();
    const int Hkv = req.shape.n_head_kv;
    std::vector<std::vector<float>> glob;
    MethodParams mp = req.method;
    const bool laser = mp.name == "laser";
    if (laser) {  // LASER-KV: B/n anchors, B/n local window, the rest global memory, one set for all layers
        if (mp.protect_divisor < 2) throw Error("LASER-KV protection divisor must be >= 2");
        mp.n_sink = mp.n_local = req.budget / mp.protect_divisor;
    }
    // Compactor weighs leverage by the fraction removed; Expected Attention
    // averages RoPE from the context's next position on.
    if (mp.ctx.beta < 0) mp.ctx.beta = 1.0f - (float) req.budget / (float) std::max(1, view.n_tokens());
    if (mp.ctx.next_pos < 0) mp.ctx.next_pos = req.label_end + 1;
    std::vector<Scores> sc = score_layers(view, mp, req.shape, req.queries, req.n_threads, &req.history,
                                          mp.name == "gkv" || mp.name == "compactor" ? &glob : nullptr);
    // Head-wise budgets: the busiest head's allocation sets the cells, and
    // every head fills them with its own best tokens (select_headwise.cpp).
    int budget = req.budget;
    CompressRequest breq = req;
    if (req.headwise != "none") {
        if (req.headwise != "adakv" && req.headwise != "global") {
            throw Error("head-wise budgets must be 'none', 'adakv' or 'global', not '" + req.headwise + "'");
        }
        if (req.shared || laser) throw Error("head-wise budgets need the per-head layout (not shared)");
        const HeadwiseAllocation a = allocate_headwise(sc, budget, req.headwise_alpha, req.headwise == "global");
        out.headwise_count = a.count;
        budget = breq.budget = a.slots;
    }
    out.slots = budget;
    // G-KV, compactor: the kept tokens' carried scores, slot order (keep is ascending per head)
    auto gather_global = [&]() {
        if (glob.empty()) return;
        const int T = view.n_tokens();
        out.global.resize(out.keep.size());
        for (size_t i = 0; i < out.keep.size(); ++i) {
            const size_t l = i / ((size_t) Hkv * budget), h = (i / budget) % Hkv;
            out.global[i] = glob[l][h * T + out.keep[i]];
        }
    };
    if (req.shared || laser) {
        // shared sets keep original positions, and llama.cpp continues at the
        // last stored position + 1: the last token must stay
        for (auto & x : sc) x.protect.back() = 1;
        const std::vector<int32_t> one = laser ? select_shared_sum(sc, budget) : select_shared(sc, budget);
        out.keep.reserve((size_t) L * Hkv * budget);
        for (int i = 0; i < L * Hkv; ++i) out.keep.insert(out.keep.end(), one.begin(), one.end());
        if (req.merge.name == "none") {
            const std::vector<int32_t> all = view.positions();
            for (int32_t t : one) out.positions.push_back(all[t]);
            gather_global();
            out.rebuilt = !req.plan_only;
            if (out.rebuilt) st = compact_shared(view, one);
            return out;
        }
    } else {
        out.keep = select_layers_per_head(sc, budget, req.n_threads);
    }
    for (int j = 0; j < budget; ++j) out.positions.push_back(req.label_end - budget + 1 + j);
    gather_global();
    Stream ns;
    if (req.merge.name == "none") {
        out.rebuilt = !req.plan_only;
        if (!out.rebuilt) return out;
        ns = compact_per_head(view, out.keep, Hkv, budget, req.label_end);
    } else {
        std::vector<float> nk, nv;
        merge_layers(view, out.keep, Hkv, budget, sc, breq, nk, nv, out.report);
        ns = compact_per_head(view, out.keep, Hkv, budget, req.label_end, nk.data(), nv.data());
    }
    st = std::move(ns);
    return out;
}

}  // namespace grkv
