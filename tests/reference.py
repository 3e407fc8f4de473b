"""Pure-PyTorch references for MS attention, written from DESIGN section 1 independently of the C code.

Everything is float64 and loops over (batch, KV head, group) in Python: slow, small, obviously right.
"""

from __future__ import annotations

import math

import torch


def groups_of_call(n: int, nq: int, span: int) -> range:
    """Absolute groups holding one of the last nq of n positions."""
    return range((n - nq) // span, (n - 1) // span + 1) if nq > 0 else range(0)


def select_ref(q, k, *, block_q, block_k, merge, topk, causal=True, local=0, key_padding_mask=None,
               coarse_regions=0, coarse_topk=0):
    """DESIGN 1.1-1.5 -> int32 (B, Hkv, G, topk), ascending, -1 padded. Key regions are summarised by
    float32 sums and counts (score = qbar . sum / count, in float64), as the kernels do. ``local``: a
    group that ranks (and has a valid query) first takes the non-empty regions among the ``local``
    just before its first token. ``coarse_regions`` > 0: multi-scale ranking, the query regions of a group
    rank only the candidates inside the best ``coarse_topk`` coarse regions for the group's mean query
    (coarse regions: the float rounding of their regions' float sums added in float64 in order, over
    their counts)."""
    q, k = q.double(), k.double()
    B, Hq, Nq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    hg, span = Hq // Hkv, block_q * merge
    nk = math.ceil(N / block_k)
    mask = key_padding_mask if key_padding_mask is not None else torch.ones(B, N, dtype=torch.bool)
    groups = groups_of_call(N, Nq, span)
    out = torch.full((B, Hkv, len(groups), topk), -1, dtype=torch.int32)
    qsum = q.view(B, Hkv, hg, Nq, D).sum(2)  # (B, Hkv, Nq, D), summed over the GQA group
    for b in range(B):
        kcount = [int(mask[b, j * block_k:(j + 1) * block_k].sum()) for j in range(nk)]
        for h in range(Hkv):
            # region sums in float32, token by token in position order (as the kernels and caches keep them)
            ksum = torch.zeros(nk, D, dtype=torch.float32)
            for t in range(N):
                if mask[b, t]:
                    ksum[t // block_k] += k[b, h, t].float()
            kbar_sum = ksum.double()
            if coarse_regions:
                nc = math.ceil(nk / coarse_regions)
                csum = torch.zeros(nc, D, dtype=torch.float64)
                for j in range(nk):  # in ascending order, as the kernels add them
                    if kcount[j] > 0:
                        csum[j // coarse_regions] += ksum[j].double()
                csum = csum.float().double()
                ccount = [sum(kcount[j * coarse_regions:(j + 1) * coarse_regions]) for j in range(nc)]
            for gi, g in enumerate(groups):
                s_g, e_g = g * span, (g + 1) * span
                if causal:
                    cand = [j for j in range(nk) if (j + 1) * block_k <= s_g and kcount[j] > 0]
                else:
                    cand = [j for j in range(nk)
                            if ((j + 1) * block_k <= s_g or j * block_k >= e_g) and kcount[j] > 0]
                if len(cand) <= topk:
                    out[b, h, gi, :len(cand)] = torch.tensor(cand, dtype=torch.int32)
                    continue
                qbars = []  # the means of the group's query regions that hold a valid query
                for a in range(g * merge, (g + 1) * merge):
                    pos = [t for t in range(a * block_q, (a + 1) * block_q) if N - Nq <= t < N and mask[b, t]]
                    if pos:
                        qbars.append(qsum[b, h, [t - (N - Nq) for t in pos]].mean(0))
                cand_t = torch.tensor(cand)
                if coarse_regions and qbars:  # the group's mean query ranks the coarse regions
                    qg = torch.zeros(D, dtype=torch.float64)
                    for qbar in qbars:
                        qg += qbar
                    qg /= len(qbars)
                    coarse = torch.tensor(sorted({j // coarse_regions for j in cand}))
                    cscores = (csum[coarse] @ qg) / torch.tensor([ccount[c] for c in coarse.tolist()],
                                                                  dtype=torch.float64)
                    kept = set(coarse[torch.sort(cscores, descending=True, stable=True).indices[:coarse_topk]].tolist())
                    cand_t = torch.tensor([j for j in cand if j // coarse_regions in kept])
                lists = []
                for qbar in qbars:
                    scores = (kbar_sum[cand_t] @ qbar) / torch.tensor([kcount[j] for j in cand_t.tolist()],
                                                                      dtype=torch.float64)
                    order = torch.sort(scores, descending=True, stable=True).indices  # ties: lower j first
                    lists.append(cand_t[order[:topk]].tolist())
                near = range(max(0, s_g // block_k - local), s_g // block_k)
                chosen = [j for j in near if kcount[j] > 0] if lists else []
                for r in range(topk):
                    for lst in lists:
                        if len(chosen) < topk and r < len(lst) and lst[r] not in chosen:
                            chosen.append(lst[r])
                chosen.sort()
                out[b, h, gi, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


def rotate(x, cos, sin, pos):
    """HF-style RoPE of x (..., L, D) at positions pos (L,), tables (P, rotary_dim/2)."""
    half = cos.shape[1]
    c, s = cos[pos].double(), sin[pos].double()
    x1, x2 = x[..., :half], x[..., half:2 * half]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, x[..., 2 * half:]], dim=-1)


def ms_attention_ref(q, k, v, index, *, block_q, block_k, merge, causal=True, scale=None,
                     key_padding_mask=None, rotary=None):
    """DESIGN 1.6 by gathering each group's keys -> (out, lse) in float64, differentiable."""
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Nq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    hg, span = Hq // Hkv, block_q * merge
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    mask = key_padding_mask if key_padding_mask is not None else torch.ones(B, N, dtype=torch.bool)
    out = q.new_zeros(B, Hq, Nq, D)
    lse = q.new_full((B, Hq, Nq), -math.inf)
    for b in range(B):
        for h in range(Hkv):
            for gi, g in enumerate(groups_of_call(N, Nq, span)):
                sel = [int(j) for j in index[b, h, gi] if j >= 0]
                keys, comp = [], []
                for i, j in enumerate(sel):
                    for t in range(j * block_k, min((j + 1) * block_k, N)):
                        keys.append(t)
                        comp.append(i * block_k + t - j * block_k)
                for t in range(g * span, min((g + 1) * span, N)):
                    keys.append(t)
                    comp.append(len(sel) * block_k + t - g * span)
                qpos = torch.arange(max(g * span, N - Nq), min((g + 1) * span, N))
                keys_t = torch.tensor(keys, dtype=torch.long)
                Q = q[b, h * hg:(h + 1) * hg, qpos - (N - Nq)]
                K, V = k[b, h, keys_t], v[b, h, keys_t]
                if rotary is not None:
                    cos, sin = rotary
                    Q = rotate(Q, cos, sin, len(sel) * block_k + qpos - g * span)
                    K = rotate(K, cos, sin, torch.tensor(comp))
                allowed = mask[b, keys_t][None, :].expand(len(qpos), -1)
                if causal:
                    allowed = allowed & (keys_t[None, :] <= qpos[:, None])
                S = (Q @ K.transpose(-1, -2) * scale).masked_fill(~allowed, -math.inf)
                L = torch.logsumexp(S, dim=-1)
                P = torch.exp(S - L[..., None]).nan_to_num(0.0)
                out[b, h * hg:(h + 1) * hg, qpos - (N - Nq)] = P @ V
                lse[b, h * hg:(h + 1) * hg, qpos - (N - Nq)] = L
    return out, lse


def sdpa_ref(q, k, v, *, causal=True, key_padding_mask=None, scale=None):
    """Dense attention in float64 with bottom-right causal mask and key padding; rows without any
    visible key give zeros. Returns (out, has_key) with has_key (B, 1, Nq) bool."""
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Nq, D = q.shape
    N, hg = k.shape[2], Hq // k.shape[1]
    k, v = k.repeat_interleave(hg, 1), v.repeat_interleave(hg, 1)
    allowed = torch.ones(B, 1, Nq, N, dtype=torch.bool)
    if causal:
        allowed = allowed & (torch.arange(N)[None, :] <= torch.arange(N - Nq, N)[:, None])
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    has_key = allowed.any(-1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    return out.nan_to_num(0.0) * has_key[..., None], has_key


def make_mask(B, N, kind):
    """None, or bool (B, N) with left or right padding of random lengths (row 0 unpadded)."""
    if kind is None:
        return None
    mask = torch.ones(B, N, dtype=torch.bool)
    for b in range(1, B):
        pad = int(torch.randint(1, max(2, N // 2 + 1), ()))
        if kind == "left":
            mask[b, :pad] = False
        else:
            mask[b, N - pad:] = False
    return mask


def rel_err(x, ref):
    """max |x - ref| / max |ref|, in double."""
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
