/* The routing op's CPU body in one pass over the step's tokens: candidates, every policy, the
 * causal ledger (bounded pool), output assembly and the integer counters.
 *
 * The torch twin (vllm_glue/select_op on the policies) is ~150-200 small torch ops per layer
 * call; on a CPU each costs microseconds, which made SeqTopK serving slower than TopK. Walking
 * the tokens in batch order also makes the causal rule direct: a request's pool at token t is its
 * ledger histogram after tokens 1..t-1, so no merge sort of the step is needed. Plain C (no torch
 * headers) so it builds in a second with the system compiler. Semantics: see policies/.
 *
 * Which branch serves a token: the policy declarations give each body they serve natively a
 * value of the enum below (``native=`` in policies/<family>.py); the caller passes, per selector
 * id of the routing op, that value (``body``), the policy the counters book it under
 * (``counted``) and whether it is the model's own rule (``model_rule``). An id without a branch
 * is an error (return 2), never routed as another policy. tests/test_native_cpu.py parses this
 * enum and the cases of ``select_token`` against the declarations. */
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { TOPK = 0, SEQTOPK = 1, TOPP = 2, ENTROPY = 3, NUM_BRANCHES = 4 };

typedef struct {
    /* --- per call (the op's arguments) --- */
    int64_t n, k;            /* tokens; the model's own experts per token */
    const float *scores;     /* [n, e] softmax / sigmoid scores */
    const float *bias;       /* [e] ranking-only bias, or NULL */
    const int32_t *group;    /* [n, u] group-limited candidate ids (-1 padding), or NULL */
    const float *van_w;      /* [n, k] the model's own routing */
    const int32_t *van_ids;  /* [n, k] */
    float *out_w;            /* [n, u] */
    int32_t *out_ids;        /* [n, u] */
    int32_t renormalize, skip_empty;
    int32_t vanilla_only;    /* every token is the model's own rule at model_k (host-known) */
    float scale;
    /* --- fixed for the layer's life (pointers into the state's persistent tensors) --- */
    int64_t e, u, model_k, num_selectors;
    int64_t sink;            /* the padding row of the per-slot tables and ledgers */
    /* per selector id: C branch (enum above, -1: none), counted policy id, model's own rule */
    const int64_t *body, *counted, *model_rule;
    const int64_t *token_slot; /* [>= n] each token's request slot, -1: padding (row sink) */
    /* per slot row [sink + 1]: selector id and the per-token options */
    const int64_t *policy, *cap, *floor_, *k_min, *k_max;
    const double *budget;    /* real > 0 (seqtopk may be fractional); topk's is integral */
    const double *p;
    /* ledger (bounded pool); pooled[row]: the row's request reads its pool (a history policy),
     * else its tokens commit seen/used only and its pool stays empty */
    int64_t *seen, *used;
    int32_t *hist, *block;
    const uint8_t *pooled;
    int64_t nbins, bs, nblocks, shift, lo, half;
    int64_t hstride;         /* histogram row stride (bins): rows start on cache lines */
    /* counters */
    int64_t *tokens_by_policy, *pairs_by_policy, *granted_by_policy; /* [policies] */
    int64_t *expert_load;    /* [e] */
    int64_t *per_token_hist; /* [u + 1] */
    int64_t *selected;       /* [rows] */
    /* prefix-cache records (vllm_glue/prefix_state.py), or rec == NULL: per token its record row
     * (a KV slot, or the sink row), and per row the pool bins (-1: not a pool member), the
     * experts taken and the experts charged, all that restoring a request's ledger needs */
    const int64_t *rec;      /* [>= n] */
    int16_t *rec_bins;       /* [rows + 1, u] */
    int16_t *rec_count, *rec_charged; /* [rows + 1] */
} Step;

static inline int32_t ordered_int(float x) {
    int32_t b;
    memcpy(&b, &x, sizeof b);
    return b < 0 ? (b ^ 0x7FFFFFFF) : b;
}

static inline int64_t pool_bin(int32_t key, const Step *s) {
    int64_t k = ((int64_t)key) >> s->shift;
    int64_t mag = k >= 0 ? k : -1 - k;
    int64_t c = mag - s->lo;
    c = c < -1 ? -1 : (c > s->half - 1 ? s->half - 1 : c);
    return k >= 0 ? s->half + 1 + c : s->half - 1 - c;
}

/* The block of a bin (bins are >= 0, blocks a power of two: checked on entry): a shift, not
 * the 40-cycle integer division the compiler emits for a runtime divisor. */
static inline int64_t block_of(int64_t bin, const Step *s) {
    return bin >> __builtin_ctzll((unsigned long long)s->bs);
}

/* Pool entries of one request in bins [lo, hi): partial blocks bin by bin, whole blocks by
 * their block sums. */
static inline int64_t count_between(const int32_t *h, const int32_t *blk, int64_t lo, int64_t hi,
                                    const Step *s) {
    if (hi <= lo) return 0;
    const int64_t klo = block_of(lo, s), khi = block_of(hi, s);
    int64_t sum = 0;
    if (klo == khi) {
        for (int64_t i = lo; i < hi; ++i) sum += h[i];
        return sum;
    }
    for (int64_t i = lo; i < (klo + 1) * s->bs; ++i) sum += h[i];
    for (int64_t i = klo + 1; i < khi; ++i) sum += blk[i];
    for (int64_t i = khi * s->bs; i < hi; ++i) sum += h[i];
    return sum;
}

/* (key, id) a ranks before (key, id) b: higher key, then lower id; id < 0 last. */
static inline int before(int32_t ka, int64_t ia, int32_t kb, int64_t ib) {
    if (ia < 0) return 0;
    if (ib < 0) return 1;
    return ka > kb || (ka == kb && ia < ib);
}

/* Insert (key, id) at position i of the best-first lists, shifting worse entries down. */
static inline void insert_at(int64_t i, int32_t key, int64_t id, int32_t *keys, int64_t *ids) {
    while (i > 0 && before(key, id, keys[i - 1], ids[i - 1])) {
        keys[i] = keys[i - 1];
        ids[i] = ids[i - 1];
        --i;
    }
    keys[i] = key;
    ids[i] = id;
}

/* Each token's best u candidates by rank = score (+ bias), best first. */
static void candidates(const Step *s, int64_t t, int64_t *ids, int32_t *keys) {
    const float *sc = s->scores + t * s->e;
    const int64_t u = s->u;
    if (s->group) { /* insertion sort of the given ids */
        for (int64_t j = 0; j < u; ++j) {
            int64_t id = s->group[t * u + j];
            int64_t safe = id < 0 ? 0 : id;
            insert_at(j, ordered_int(s->bias ? sc[safe] + s->bias[safe] : sc[safe]), id, keys, ids);
        }
        return;
    }
    /* the first u experts fill the list; after that ids only grow, so a later expert enters
     * only with a strictly higher key than the worst kept (it loses ties: a higher id), one
     * integer compare for most experts */
    const int64_t e = s->e, first = u < e ? u : e;
    const float *b = s->bias;
    for (int64_t x = 0; x < first; ++x)
        insert_at(x, ordered_int(b ? sc[x] + b[x] : sc[x]), x, keys, ids);
    for (int64_t x = first; x < u; ++x) { /* fewer experts than the width: -1 padding, last */
        keys[x] = 0;
        ids[x] = -1;
    }
    int32_t worst = keys[u - 1];
    for (int64_t x = first; x < e; ++x) {
        const int32_t key = ordered_int(b ? sc[x] + b[x] : sc[x]);
        if (key <= worst) continue;
        insert_at(u - 1, key, x, keys, ids); /* the worst entry drops out */
        worst = keys[u - 1];
    }
}

/* A token's row of the per-slot tables and ledgers: its request's slot, or the sink (padding). */
static inline int64_t row_of(const Step *s, int64_t t) {
    return s->token_slot[t] < 0 ? s->sink : s->token_slot[t];
}

static inline int64_t clamp64(int64_t x, int64_t lo, int64_t hi) {
    return x < lo ? lo : (x > hi ? hi : x);
}

/* The token's selection by its branch: experts taken (count) and charged to its budget;
 * bins[j] are its candidates' pool bins. Returns 0, or -1 for a code without a branch. */
static int select_token(const Step *s, int64_t t, int64_t code, const int64_t *ids, const int32_t *keys,
                        int64_t *bins, int64_t *count_out, int64_t *charged_out) {
    const float *sc = s->scores + t * s->e;
    const int64_t u = s->u, e = s->e, r = row_of(s, t), fl = s->floor_[r];
    const int64_t cap = s->cap[r] < u ? s->cap[r] : u;
    int64_t want, count, charged;
    double mass = 0.0;
    switch (code) {
    case SEQTOPK: {
        const int32_t *h = s->hist + r * s->hstride, *blk = s->block + r * s->nblocks;
        /* t * B in double, as the torch policy computes it (exact for an integer B): a rank is
         * below it iff below its ceil; the ledger allows floor(t * B) */
        const double tb = (double)(s->seen[r] + 1) * s->budget[r];
        const int64_t allowed = (int64_t)floor(tb), below = (int64_t)ceil(tb);
        /* candidates come best first, so their bins descend: each count at or above a bin
         * extends the previous one (an id -1 of a group router, ranked last, may not descend:
         * counted afresh) */
        int64_t taken = 0, prev = s->nbins, above = 0;
        for (int64_t j = 0; j < cap; ++j) {
            bins[j] = pool_bin(keys[j], s);
            if (bins[j] <= prev) above += count_between(h, blk, bins[j], prev, s);
            else above = count_between(h, blk, bins[j], s->nbins, s);
            prev = bins[j];
            if (j + above < below) ++taken;
        }
        charged = (s->used[r] + taken < allowed ? s->used[r] + taken : allowed) - s->used[r];
        count = clamp64(charged, fl, cap);
        *count_out = count;
        *charged_out = charged < count ? charged : count;
        return 0;
    }
    case TOPK:
        want = (int64_t)s->budget[r];
        break;
    case TOPP: {
        for (int64_t x = 0; x < e; ++x) mass += (double)sc[x];
        double cum = 0.0;
        int64_t below = 0;
        for (int64_t j = 0; j < u; ++j) {
            cum += (double)sc[ids[j] < 0 ? 0 : ids[j]] / mass;
            below += cum < s->p[r];
        }
        want = 1 + below;
        break;
    }
    case ENTROPY: {
        for (int64_t x = 0; x < e; ++x) mass += (double)sc[x];
        double hsum = 0.0, m = mass > 1e-300 ? mass : 1e-300;
        for (int64_t x = 0; x < e; ++x) {
            double q = (double)sc[x] / m;
            if (q > 0) hsum += q * log(q);
        }
        double ent = e > 1 ? -hsum / log((double)e) : 0.0;
        double span = (double)(s->k_max[r] - s->k_min[r]);
        want = clamp64((int64_t)floor((double)s->k_min[r] + ent * span + 0.5), s->k_min[r], s->k_max[r]);
        break;
    }
    default:
        return -1;
    }
    *count_out = *charged_out = clamp64(want, fl, cap);
    for (int64_t j = 0; j < cap; ++j) bins[j] = pool_bin(keys[j], s);
    return 0;
}

/* A step where every token is the model's own rule at model_k (the host knows it): the model's
 * routing padded to u (padding ids: -1, or the token's first expert), no candidates and no pool
 * bins (TopK never reads the pool), the ledger's seen/used and the counters as every step. */
static void vanilla_step(Step *s) {
    const int64_t u = s->u, k = s->k;
    for (int64_t t = 0; t < s->n; ++t) {
        const int64_t r = row_of(s, t), sid = s->policy[r];
        float *w = s->out_w + t * u;
        int32_t *oid = s->out_ids + t * u;
        const float *vw = s->van_w + t * k;
        const int32_t *vi = s->van_ids + t * k;
        for (int64_t j = 0; j < u; ++j) {
            w[j] = j < k ? vw[j] : 0.0f;
            oid[j] = j < k ? vi[j] : (s->skip_empty ? -1 : vi[0]);
        }
        s->seen[r] += 1;
        s->used[r] += k;
        if (s->token_slot[t] >= 0) {
            const int64_t counted = s->counted[sid];
            s->tokens_by_policy[counted] += 1;
            s->pairs_by_policy[counted] += k;
            s->granted_by_policy[counted] += k;
            for (int64_t j = 0; j < u; ++j)
                if (w[j] > 0.0f && oid[j] >= 0) s->expert_load[oid[j]] += 1;
            s->per_token_hist[k < u ? k : u] += 1;
            s->selected[r] += k;
        }
        if (s->rec) {
            const int64_t q = s->rec[t];
            for (int64_t j = 0; j < u; ++j) s->rec_bins[q * u + j] = -1;
            s->rec_count[q] = (int16_t)k;
            s->rec_charged[q] = (int16_t)k;
        }
    }
}

int seqroute_select_cpu(Step *s) {
    const int64_t u = s->u;
    if (s->bs <= 0 || (s->bs & (s->bs - 1))) return 3; /* block_of needs a power of two */
    for (int64_t t = 0; t < s->n; ++t) { /* every token's selector has a branch: else route none */
        const int64_t sid = s->policy[row_of(s, t)];
        if (sid < 0 || sid >= s->num_selectors || s->body[sid] < 0 || s->body[sid] >= NUM_BRANCHES)
            return 2;
    }
    if (s->vanilla_only) {
        vanilla_step(s);
        return 0;
    }
    int64_t ids[u], bins[u]; /* u: the op's width, a few dozen at most */
    int32_t keys[u];
    for (int64_t t = 0; t < s->n; ++t) {
        const float *sc = s->scores + t * s->e;
        const int64_t r = row_of(s, t), sid = s->policy[r];
        const int64_t cap = s->cap[r] < u ? s->cap[r] : u;
        candidates(s, t, ids, keys);
        int64_t count, charged;
        if (select_token(s, t, s->body[sid], ids, keys, bins, &count, &charged) != 0)
            return 2; /* unreachable: checked above */
        /* the ledger: every token, whatever its policy; the pool only where it is read (a
         * cold row costs ~0.7 us per token and layer: kernels/NOTES.md) */
        s->seen[r] += 1;
        s->used[r] += charged;
        for (int64_t j = 0; j < cap && s->pooled[r]; ++j) {
            if (ids[j] < 0) continue;
            s->hist[r * s->hstride + bins[j]] += 1;
            s->block[r * s->nblocks + block_of(bins[j], s)] += 1;
        }
        /* assembly */
        float *w = s->out_w + t * u;
        int32_t *oid = s->out_ids + t * u;
        int64_t n_used = 0;
        const int vanilla = s->model_rule[sid] && s->budget[r] == (double)s->model_k;
        if (vanilla) { /* the model's own routing, bit for bit */
            for (int64_t j = 0; j < u; ++j) {
                if (j < s->k) {
                    w[j] = s->van_w[t * s->k + j];
                    oid[j] = s->van_ids[t * s->k + j];
                } else {
                    w[j] = 0.0f;
                    oid[j] = s->skip_empty ? -1 : (int32_t)(ids[j] < 0 ? 0 : ids[j]);
                }
            }
            n_used = s->k;
        } else {
            float total = 0.0f;
            for (int64_t j = 0; j < u; ++j) {
                int keep = j < count && ids[j] >= 0;
                int64_t safe = ids[j] < 0 ? 0 : ids[j];
                w[j] = keep ? sc[safe] : 0.0f;
                total += w[j];
                oid[j] = keep || !s->skip_empty ? (int32_t)safe : -1;
                n_used += keep;
            }
            if (s->renormalize) {
                const float tiny = 1.17549435e-38f;
                total = total > tiny ? total : tiny;
                for (int64_t j = 0; j < u; ++j) w[j] = w[j] / total;
            }
            if (s->scale != 1.0f)
                for (int64_t j = 0; j < u; ++j) w[j] = w[j] * s->scale;
        }
        /* counters: requests' tokens only, never padding */
        if (s->token_slot[t] >= 0) {
            const int64_t counted = s->counted[sid];
            s->tokens_by_policy[counted] += 1;
            s->pairs_by_policy[counted] += n_used;
            s->granted_by_policy[counted] += charged;
            for (int64_t j = 0; j < u; ++j)
                if (w[j] > 0.0f && oid[j] >= 0) s->expert_load[oid[j]] += 1;
            s->per_token_hist[n_used < u ? n_used : u] += 1;
            s->selected[r] += n_used;
        }
        if (s->rec) {
            const int64_t q = s->rec[t];
            for (int64_t j = 0; j < u; ++j)
                s->rec_bins[q * u + j] = (int16_t)(j < cap && ids[j] >= 0 ? bins[j] : -1);
            s->rec_count[q] = (int16_t)n_used;
            s->rec_charged[q] = (int16_t)charged;
        }
    }
    return 0;
}
