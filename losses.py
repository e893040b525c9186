"""Losses, one function per equation of the papers.

Dynamic Token Morphing (DTM paper, Sec. 4):
    levels = sample_levels(N)                         # [(N_m, k), ...], L = 2 by default
    loss = dtm_loss(u, v, levels)                     # Eqs. 1-5; u online (B, N, C), v target
    assign = dtm_assignment(v, num_morphed, num_iters)  # (B, N) cluster id of every token

The token-wise baseline is `tokenwise_loss(u, v)` (= dtm_loss with N_m = N); the paper's other
baselines are `fixed_levels(N)` (fixed morphing to N/2) and `downsample_assignment(grid)` (2x2).
"""
import math
import random
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Distances d_i between morphed tokens (Eq. 4; Table 10 compares them)

DISTANCES = ("cosine", "smooth_l1", "l1", "l2")


def distance(u_hat: torch.Tensor, v_hat: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """d_i(u_hat_i, v_hat_i) per morphed token: (B, M, C) x (B, M, C) -> (B, M)."""
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(u_hat, v_hat, dim=-1, eps=1e-6)
    if kind == "smooth_l1":  # beta 2, as the authors' public code
        return F.smooth_l1_loss(u_hat, v_hat, beta=2.0, reduction="none").mean(-1)
    if kind == "l1":
        return (u_hat - v_hat).abs().mean(-1)
    if kind == "l2":
        return (u_hat - v_hat).pow(2).mean(-1)
    raise ValueError(f"unknown distance '{kind}': choose one of {DISTANCES}")


def tokenwise_loss(u: torch.Tensor, v: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """The baseline: (1/N) sum_i d(u_i, v_i), mean over the batch. u, v: (B, N, C)."""
    return distance(u.float(), v.float(), kind).mean()


# -----------------------------------------------------------------------------
# Dynamic token morphing schedule (Eq. 1) and level sampling

def morph_schedule(num_tokens: int, num_morphed: int, num_iters: int) -> List[int]:
    """R = {r_j}: how many tokens to merge at iteration j = 1..k (Eq. 1).

    r_j = floor((N - N_m) / k) for j < k and the remainder at j = k, so sum_j r_j = N - N_m.
    (The printed Eq. 1 writes N instead of N - N_m in the last term, which would not sum to
    N - N_m; we implement the stated constraint.)
    """
    total = num_tokens - num_morphed
    step = total // num_iters
    return [step] * (num_iters - 1) + [total - (num_iters - 1) * step]


def sample_levels(num_tokens: int, num_levels: int = 2, max_iters: int = 14,
                  min_morphed: int = 1, rng: Optional[random.Random] = None) -> List[Tuple[int, int]]:
    """Per batch and level: N_m = N - U{0..N - min_morphed}, k ~ U{1..max_iters} (NOTES.md).

    Drawn on the host (no device sync); pass an rng seeded identically on every rank.
    """
    rng = rng or random
    levels = []
    for _ in range(num_levels):
        num_morphed = num_tokens - rng.randint(0, num_tokens - min_morphed)
        levels.append((num_morphed, rng.randint(1, max_iters)))
    return levels


def fixed_levels(num_tokens: int, num_iters: int = 1) -> List[Tuple[int, int]]:
    """Baseline: fixed (non-dynamic) morphing to N/2 tokens."""
    return [(max(num_tokens // 2, 1), num_iters)]


# -----------------------------------------------------------------------------
# Token morphing by iterative bipartite matching (Eq. 2)

def _bipartite_merge(sums, sizes, r):
    """One ToMe step on a batch of T current tokens: merge the r best A->B pairs.

    sums (B, T, C): sum of the original target tokens each current token stands for;
    sizes (B, T): how many. A = even positions, B = odd positions. Returns the new sums, sizes
    and new_pos (B, T): where each current token goes in the new list of T - r tokens.
    """
    Bsz, T, C = sums.shape
    feats = F.normalize(sums / sizes.unsqueeze(-1), dim=-1)  # size-weighted means, unit norm
    a, b = feats[:, 0::2], feats[:, 1::2]                    # (B, Ta, C), (B, Tb, C)
    Ta, Tb = a.shape[1], b.shape[1]
    scores = a @ b.transpose(1, 2)                           # cosine similarity (B, Ta, Tb)
    node_max, node_idx = scores.max(dim=-1)                  # best partner in B for each A
    order = node_max.argsort(dim=-1, descending=True)        # most similar A tokens first
    src, unm = order[:, :r], order[:, r:]                    # A tokens that merge / stay
    dst = node_idx.gather(1, src)                            # their partners in B

    keep = Ta - r                                            # new list: [kept A..., all B...]
    pos_a = torch.empty_like(node_idx)
    pos_a.scatter_(1, unm, torch.arange(keep, device=sums.device).expand(Bsz, keep))
    pos_a.scatter_(1, src, keep + dst)
    new_pos = torch.empty(Bsz, T, dtype=torch.long, device=sums.device)
    new_pos[:, 0::2] = pos_a
    new_pos[:, 1::2] = keep + torch.arange(Tb, device=sums.device)

    sums_a, sums_b = sums[:, 0::2], sums[:, 1::2]
    sizes_a, sizes_b = sizes[:, 0::2], sizes[:, 1::2]
    sums_b = sums_b.scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, C), sums_a.gather(1, src.unsqueeze(-1).expand(-1, -1, C)))
    sizes_b = sizes_b.scatter_add(1, dst, sizes_a.gather(1, src))
    new_sums = torch.cat([sums_a.gather(1, unm.unsqueeze(-1).expand(-1, -1, C)), sums_b], dim=1)
    new_sizes = torch.cat([sizes_a.gather(1, unm), sizes_b], dim=1)
    return new_sums, new_sizes, new_pos


@torch.no_grad()
def dtm_assignment(target: torch.Tensor, num_morphed: int, num_iters: int) -> torch.Tensor:
    """Cluster id in [0, N_m) of every token: the morphing matrix M of Eq. 2 as (B, N) ids.

    m_ij = 1 iff assign[j] == i. Tokens are merged by k rounds of bipartite matching on the
    (detached) target tokens with the Eq. 1 schedule. One round can merge at most |A| = ceil(T/2)
    tokens; what does not fit carries over to the next round, and extra rounds run until exactly
    N_m morphed tokens remain. The number of rounds depends only on (N, N_m, k), so the whole
    assignment runs on the device with no host synchronisation and no loop over images.
    """
    B, N, C = target.shape
    if not 1 <= num_morphed <= N or num_iters < 1:
        raise ValueError(f"need 1 <= N_m <= N (= {N}) and k >= 1, got N_m={num_morphed}, k={num_iters}")
    sums = target.float()
    sizes = torch.ones(B, N, device=target.device)
    assign = torch.arange(N, device=target.device).expand(B, N)  # current token of each original
    tokens, carry = N, 0
    schedule = morph_schedule(N, num_morphed, num_iters)
    while schedule or carry:
        want = (schedule.pop(0) if schedule else 0) + carry
        r = min(want, (tokens + 1) // 2)
        carry = want - r
        if r == 0:
            continue
        sums, sizes, new_pos = _bipartite_merge(sums, sizes, r)
        assign = new_pos.gather(1, assign)
        tokens -= r
    return assign


def downsample_assignment(grid: int, batch: int = 1, device=None) -> torch.Tensor:
    """Baseline: fixed 2x2 average pooling of the token grid, as an assignment (B, N)."""
    ys, xs = torch.meshgrid(torch.arange(grid, device=device), torch.arange(grid, device=device), indexing="ij")
    ids = (ys // 2) * ((grid + 1) // 2) + xs // 2
    return ids.flatten().expand(batch, -1)


# -----------------------------------------------------------------------------
# Morphed tokens (Eq. 3) and the DTM loss (Eqs. 4-5)

def morph(tokens: torch.Tensor, assign: torch.Tensor, num_morphed: int):
    """Eq. 3: u_hat_i = sum_j m_ij u_j. (B, N, C), (B, N) -> sums (B, N_m, C), w (B, N_m)."""
    B, N, C = tokens.shape
    sums = tokens.new_zeros(B, num_morphed, C).scatter_add(1, assign.unsqueeze(-1).expand(-1, -1, C), tokens)
    w = tokens.new_zeros(B, num_morphed).scatter_add(1, assign, tokens.new_ones(B, N))  # w_i = sum_j m_ij
    return sums, w


def morphed_distance(u, v, assign, num_morphed, kind="cosine"):
    """Eq. 4 normalised by N: (1/N) sum_i w_i d(u_hat_i, v_hat_i), mean over the batch.

    Cosine distance does not care whether u_hat is the sum of Eq. 3 or the mean; the regression
    distances compare means (as the authors' code), so their scale does not grow with w_i.
    """
    u, v = u.float(), v.float()
    u_sum, w = morph(u, assign, num_morphed)
    v_sum, _ = morph(v, assign, num_morphed)
    w_ = w.clamp(min=1).unsqueeze(-1)
    d = distance(u_sum / w_, v_sum / w_, kind)              # (B, N_m)
    return (w * d).sum(-1).div(u.shape[1]).mean()


def dtm_loss(u: torch.Tensor, v: torch.Tensor, levels: Sequence[Tuple[int, int]],
             kind: str = "cosine") -> torch.Tensor:
    """Eq. 5: sum over levels l of L_DTM^l. u online (B, N, C), v target (B, N, C).

    The morphing of each level is computed from the detached target v and applied to both.
    """
    loss = u.new_zeros((), dtype=torch.float32)
    for num_morphed, num_iters in levels:
        assign = dtm_assignment(v.detach(), num_morphed, num_iters)
        loss = loss + morphed_distance(u, v, assign, num_morphed, kind)
    return loss
