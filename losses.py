"""The three methods' losses and heads, one function per equation of the papers.

Each numbered section needs only torch (and Python's math and random): copy the one you want.
What each paper leaves open, and what this code decides, is written in DECISIONS.md.

  1. Dynamic Token Morphing (DTM)       dtm_loss, dtm_assignment, kmeans_assignment, ...
  2. Masked Token Optimization (MTO)    pixel_loss, heterogeneity, mto_losses, rauc, ...
  3. Beyond [cls] probe heads           AbMILP, ProbeHeads, probe_loss, knn_votes, ...
"""
# =================================================================================================
# 1. Dynamic Token Morphing (DTM)
#
# Paper: "Masked Image Modeling via Dynamic Token Morphing" (v3: "Morphing Tokens Draw Strong
# Masked Image Models"), Taekyung Kim, Byeongho Heo, Dongyoon Han, arXiv:2401.00254.
#
# What: distil a teacher's patch tokens v (B, N, C) into the student's u, comparing them after
# merging contextually similar tokens: k rounds of bipartite matching (ToMe) group v into N_m
# clusters, each cluster is summed on both sides (Eq. 3) and the sums are compared with a
# size-weighted distance (Eq. 4). N_m and k are drawn anew for every batch and level (Eqs. 1, 5):
# the target ranges from token-wise (N_m = N) to one token per image (N_m = 1).
# Why: neighbouring patch tokens of a teacher often disagree ("spatial inconsistency"); morphed
# tokens are a smoother, contextual target that trains a better student.
#
#     levels = sample_levels(N)                            # [(N_m, k), ...], L = 2 by default
#     loss = dtm_loss(u, v, levels)                        # Eqs. 1-5; u online, v target (B, N, C)
#     assign = dtm_assignment(v, num_morphed, num_iters)   # (B, N) cluster id of every token
# =================================================================================================
import math
import random
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

DISTANCES = ("cosine", "smooth_l1", "l1", "l2")


# -------------------------------------------------------------------------------------------------
# Dynamic token morphing schedule (Eq. 1) and level sampling

def morph_schedule(num_tokens: int, num_morphed: int, num_iters: int) -> List[int]:
    """R = {r_j}, the merges of iteration j = 1..k (Eq. 1): r_j = floor((N - N_m) / k), the rest at
    j = k, so sum_j r_j = N - N_m (the printed Eq. 1 has N where N - N_m is meant)."""
    total = num_tokens - num_morphed
    step = total // num_iters
    return [step] * (num_iters - 1) + [total - (num_iters - 1) * step]


def merge_rounds(num_tokens: int, num_morphed: int, num_iters: int) -> List[int]:
    """The merges each round really makes: R (Eq. 1), capped at |A| = ceil(T / 2) for a round of
    T tokens; what does not fit carries over, and extra rounds run until N_m tokens remain."""
    rounds, tokens, carry = [], num_tokens, 0
    schedule = morph_schedule(num_tokens, num_morphed, num_iters)
    while schedule or carry:
        want = (schedule.pop(0) if schedule else 0) + carry
        r = min(want, (tokens + 1) // 2)
        carry, tokens = want - r, tokens - r
        rounds += [r] if r else []
    return rounds


def sample_levels(num_tokens: int, num_levels: int = 2, max_iters: int = 14, min_morphed: int = 1,
                  rng: Optional[random.Random] = None) -> List[Tuple[int, int]]:
    """Per batch and level: N_m = N - U{0..N - min_morphed}, k ~ U{1..max_iters}. Pass an rng
    seeded alike on every rank, so that every rank morphs the same way."""
    rng = rng or random
    return [(num_tokens - rng.randint(0, num_tokens - min_morphed), rng.randint(1, max_iters))
            for _ in range(num_levels)]


def _check_level(num_tokens: int, num_morphed: int, num_iters: int):
    if not 1 <= num_morphed <= num_tokens or num_iters < 1:
        raise ValueError(f"need 1 <= N_m <= N (= {num_tokens}) and k >= 1, "
                         f"got N_m={num_morphed}, k={num_iters}")


# -------------------------------------------------------------------------------------------------
# Token morphing by iterative bipartite matching (Eq. 2): the readable loop, then the batched one

def dtm_assignment_loop(tokens: torch.Tensor, num_morphed: int, num_iters: int) -> torch.Tensor:
    """The morphing of ONE image, written as plain loops: tokens (N, C) -> cluster ids (N,).

    Current tokens are clusters of original tokens, each represented by the sum of its members.
    Each round: set A = current tokens at even positions, set B = odd positions; every A token
    picks the B token it is most cosine-similar to; the r A tokens with the best scores merge
    into their partners. The new list is [the A tokens that stay, best score first, then all B
    tokens in order] (ToMe's order), so a cluster's id is its place in the final list. The
    rounds' merges: merge_rounds.

    Worked by hand: v = [(1,0), (1,0), (0,1), (0,-1)], N_m = 3, k = 1. A = {0, 2}, B = {1, 3}.
    Token 0's best partner is 1 (cosine 1); token 2's is 1 (cosine 0 > -1). r = 1: only 0 -> 1
    merges. New list [2, 1+0, 3] -> ids [1, 1, 0, 2]. dtm_assignment does the same batched.
    """
    N = tokens.shape[0]
    _check_level(N, num_morphed, num_iters)
    clusters = [([j], tokens[j].double()) for j in range(N)]     # (members, sum of their tokens)
    for r in merge_rounds(N, num_morphed, num_iters):
        set_a, set_b = clusters[0::2], clusters[1::2]
        pairs = []                                                # (score, A token, its partner)
        for a in set_a:
            scores = [F.cosine_similarity(a[1], b[1], dim=0).item() for b in set_b]
            best = max(range(len(set_b)), key=lambda t: scores[t])
            pairs.append((scores[best], a, best))
        pairs.sort(key=lambda p: -p[0])                           # most similar first
        for _, (members, total), b in pairs[:r]:                  # the r best pairs merge
            set_b[b] = (set_b[b][0] + members, set_b[b][1] + total)
        clusters = [a for _, a, _ in pairs[r:]] + set_b
    ids = torch.empty(N, dtype=torch.long)
    for cluster_id, (members, _) in enumerate(clusters):
        ids[members] = cluster_id
    return ids


def bipartite_merge(x: torch.Tensor, num_merges: int, dim: int) -> torch.Tensor:
    """One round of ToMe's bipartite matching on a batch of T current tokens -> (B, T - r, W).

    x (B, T, W): a row per current token, its first `dim` channels the sum of the target tokens
    it stands for (a sum has the cosine of the mean); the other channels are summed alike. A =
    even, B = odd positions; the r A tokens with the most similar partner in B add their rows to
    it. Rows come out as [A tokens that stay, best score first; all B] (dtm_assignment_loop's).
    """
    B, T, W = x.shape
    r = num_merges
    feats = F.normalize(x[..., :dim], dim=-1)                   # directions of the group means
    scores = feats[:, 0::2] @ feats[:, 1::2].transpose(1, 2)    # cosine similarity (B, Ta, Tb)
    best_score, partner = scores.max(dim=-1)                    # best B token for each A token
    rank = best_score.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0: the most similar
    keep = scores.shape[1] - r                                  # A tokens that stay
    new_a = torch.where(rank < r, keep + partner, rank - r)     # each A row's place (B, Ta)
    out = F.pad(x[:, 1::2], (0, 0, keep, 0))                    # [staying A: 0 so far, all B]
    return out.scatter_add_(1, new_a.unsqueeze(-1).expand(-1, -1, W), x[:, 0::2])


@torch.no_grad()
def dtm_assignment(target: torch.Tensor, num_morphed: int, num_iters: int,
                   merge=bipartite_merge) -> torch.Tensor:
    """Cluster id in [0, N_m) of every token: the morphing matrix M of Eq. 2 as (B, N) ids.

    m_ij = 1 iff assign[j] == i. The batched dtm_assignment_loop (read that one first): rounds of
    bipartite matching on the target tokens with the Eq. 1 schedule until N_m tokens remain. Each
    row carries [the sum of its members' target tokens | its row of M]: M starts as the identity
    and a merge adds two rows, so M is read off the rows at the end. merge: the round.
    """
    B, N, C = target.shape
    _check_level(N, num_morphed, num_iters)
    with torch.autocast(target.device.type, enabled=False):  # in fp32: bf16 pairs other tokens
        eye = torch.eye(N, device=target.device).expand(B, N, N)
        x = torch.cat([target.float(), eye], dim=-1)           # (B, N, C + N): [V | M = I]
        for r in merge_rounds(N, num_morphed, num_iters):
            x = merge(x, r, C)                                 # (B, T - r, C + N)
    return x[..., C:].argmax(dim=1)                            # M (B, N_m, N) -> ids (B, N)


# -------------------------------------------------------------------------------------------------
# Morphed tokens (Eq. 3), the distance between them (Eq. 4) and the DTM loss (Eq. 5)

def morph(tokens: torch.Tensor, assign: torch.Tensor, num_morphed: int):
    """Eq. 3: u_hat_i = sum_j m_ij u_j. (B, N, C), (B, N) -> sums (B, N_m, C), w (B, N_m)."""
    return morph_sums(tokens, assign, num_morphed), cluster_sizes(tokens, assign, num_morphed)


def morph_sums(tokens: torch.Tensor, assign: torch.Tensor, num_morphed: int) -> torch.Tensor:
    """u_hat of Eq. 3: (B, N, C), (B, N) -> (B, N_m, C)."""
    B, N, C = tokens.shape
    index = assign.unsqueeze(-1).expand(-1, -1, C)
    return tokens.new_zeros(B, num_morphed, C).scatter_add(1, index, tokens)


def cluster_sizes(tokens: torch.Tensor, assign: torch.Tensor, num_morphed: int) -> torch.Tensor:
    """w_i = sum_j m_ij, the number of tokens in morphed token i: (B, N) -> (B, N_m)."""
    B, N = assign.shape
    return tokens.new_zeros(B, num_morphed).scatter_add(1, assign, tokens.new_ones(B, N))


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


def morphed_distance(u, v, assign, num_morphed, kind="cosine"):
    """Eq. 4 normalised by N: (1/N) sum_i w_i d(u_hat_i, v_hat_i), mean over the batch.

    d compares the means u_hat_i / w_i: the same cosine as the sums, and regression distances
    (as the authors' code) whose scale does not grow with w_i.
    """
    u, v = u.float(), v.float()
    u_sum, w = morph(u, assign, num_morphed)               # (B, N_m, C), (B, N_m)
    v_sum = morph_sums(v, assign, num_morphed)
    w_ = w.clamp(min=1).unsqueeze(-1)
    d = distance(u_sum / w_, v_sum / w_, kind)              # (B, N_m)
    return (w * d).sum(-1).div(u.shape[1]).mean()


def dtm_loss(u: torch.Tensor, v: torch.Tensor, levels: Sequence[Tuple[int, int]],
             kind: str = "cosine", matching: str = "bipartite",
             merge=bipartite_merge) -> torch.Tensor:
    """Eq. 5: sum over levels l of L_DTM^l. u online (B, N, C), v target (B, N, C).

    Each level's morphing comes from the detached target v and is applied to both. matching:
    'bipartite' (Eq. 2; merge: its round) or 'kmeans' (Table 11; k = K-Means steps).
    """
    v = v.float()
    terms = []                                             # L_DTM^l of each level
    for num_morphed, num_iters in levels:
        if matching == "bipartite":                        # Eq. 2, on the detached target
            assign = dtm_assignment(v.detach(), num_morphed, num_iters, merge=merge)
        elif matching == "kmeans":                         # Table 11
            assign = kmeans_assignment(v.detach(), num_morphed, num_iters)
        else:
            raise ValueError(f"unknown matching '{matching}': choose 'bipartite' or 'kmeans'")
        terms.append(morphed_distance(u, v, assign, num_morphed, kind))
    if not terms:
        return u.new_zeros((), dtype=torch.float32)
    return sum(terms[1:], terms[0])                        # L^1 + L^2 + ...


# -------------------------------------------------------------------------------------------------
# DTM's ablations (Tables 9-11): token-wise distillation, fixed morphing to N/2, 2x2 pooling, and
# K-Means instead of bipartite matching (Table 11)

def tokenwise_loss(u: torch.Tensor, v: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """The baseline: (1/N) sum_i d(u_i, v_i), mean over the batch. u, v: (B, N, C)."""
    return distance(u.float(), v.float(), kind).mean()


def fixed_levels(num_tokens: int, num_iters: int = 1) -> List[Tuple[int, int]]:
    """Baseline: fixed (non-dynamic) morphing to N/2 tokens."""
    return [(max(num_tokens // 2, 1), num_iters)]


def downsample_assignment(grid: int, batch: int = 1, device=None) -> torch.Tensor:
    """Baseline: fixed 2x2 average pooling of the token grid, as an assignment (B, N)."""
    ys, xs = torch.meshgrid(torch.arange(grid, device=device), torch.arange(grid, device=device),
                            indexing="ij")
    ids = (ys // 2) * ((grid + 1) // 2) + xs // 2
    return ids.flatten().expand(batch, -1)


@torch.no_grad()
def kmeans_assignment(target: torch.Tensor, num_morphed: int, num_iters: int) -> torch.Tensor:
    """Spherical K-Means with K = N_m clusters and k assignment steps: (B, N, C) -> ids (B, N).

    dtm_assignment's format (ids in [0, N_m), every id used), so dtm_loss takes it unchanged.
    Cosine similarity, as the matching: each unit token joins the most similar centre (ties: the
    lowest id), a centre is the normalised mean of its members. Farthest-point seeds (no dice, so
    every rank agrees); a cluster left empty takes a token (_fill_empty_clusters).
    """
    B, N, C = target.shape
    _check_level(N, num_morphed, num_iters)
    with torch.autocast(target.device.type, enabled=False):  # the clustering in fp32, always
        feats = F.normalize(target.float(), dim=-1)                   # (B, N, C)
        centres = _seed_centres(feats, num_morphed)                   # (B, K, C)
        for step in range(num_iters):
            score, assign = (feats @ centres.transpose(1, 2)).max(dim=-1)  # (B, N) each
            assign = _fill_empty_clusters(assign, score, num_morphed)
            if step < num_iters - 1:
                centres = F.normalize(morph_sums(feats, assign, num_morphed), dim=-1)
    return assign


def _seed_centres(feats: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Farthest-point seeds (K-Means++ without the dice): token 0, then again and again the token
    least similar to its most similar seed so far. (B, N, C) unit tokens -> (B, K, C)."""
    B, N, C = feats.shape
    seeds = torch.zeros(B, num_clusters, dtype=torch.long, device=feats.device)
    nearest = (feats * feats[:, :1]).sum(-1)                          # (B, N): best seed sim
    for i in range(1, num_clusters):
        seeds[:, i] = nearest.argmin(dim=1)
        nearest = torch.maximum(nearest, (feats * _take(feats, seeds[:, i:i + 1])).sum(-1))
    return _take(feats, seeds)


def _fill_empty_clusters(assign: torch.Tensor, score: torch.Tensor, num_clusters: int):
    """Give each empty cluster one token, never emptying another cluster. (B, N) -> (B, N).

    Every non-empty cluster keeps its keeper: the member most similar to its centre (the lowest
    index among ties). Of the other tokens, the e least similar to their own centre move, the
    worst one to the empty cluster with the lowest id, and so on (N >= K, so enough can move).
    """
    B, N = assign.shape
    K = num_clusters
    pos = torch.arange(N, device=assign.device).expand(B, N)
    present = torch.zeros(B, K, dtype=torch.bool, device=assign.device).scatter_(1, assign, True)
    num_empty = (~present).sum(1)                                     # (B,)
    best = score.new_full((B, K), -math.inf).scatter_reduce(1, assign, score, "amax")
    is_best = score == best.gather(1, assign)
    first = torch.full((B, K), N, device=assign.device)
    first = first.scatter_reduce(1, assign, torch.where(is_best, pos, N), "amin")
    keeper = pos == first.gather(1, assign)                           # one per cluster
    movers = torch.where(keeper, math.inf, score).argsort(dim=1, stable=True)[:, :K]  # (B, K)
    empty_ids = present.to(torch.uint8).argsort(dim=1, stable=True)  # empty clusters first
    moves = torch.arange(K, device=assign.device) < num_empty.unsqueeze(1)  # (B, K)
    new_ids = torch.where(moves, empty_ids, assign.gather(1, movers))
    return assign.scatter(1, movers, new_ids)


def _take(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (B, T, C), ids (B, K) -> (B, K, C): the rows of x at those positions."""
    return x.gather(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# =================================================================================================
# 2. Masked Token Optimization (MTO)
#
# Paper: "Emerging Property of Masked Token for Effective Pre-training", Hyesong Choi, Hunsang
# Lee, Seyoung Joung, Hyejin Park, Jiyeong Kim, Dongbo Min, arXiv:2404.08330 (ECCV 2024).
#
# What: three extra losses for any MIM method whose blocks see mask tokens (SimMIM: the encoder;
# MAE: the decoder), built on the heterogeneity H^l (Eq. 2), the entropy of the masked tokens'
# attention-like affinity to the visible tokens at layer l. L_spa (Eq. 3) makes each visible
# token attend to few tokens of the initial embedding; L_e (Eq. 4) raises H^0; L_r (Eq. 5) makes
# H fall with depth. RAUC (Eq. 6) compares two accuracy-vs-epoch curves.
# Why: converged MIM models show high H^0 falling with depth; enforcing it from the start is
# reported to halve the pre-training epochs.
#
# hiddens = X^0..X^L, the per-layer tokens (B, 1+N, D) of the blocks that hold the mask tokens,
# each normed as its attention sees it (X^0: the initial embedding):
#     loss = pixel_loss(pred, target, mask, "l1")            # Eq. 1 (SimMIM; MAE: "l2")
#     terms = mto_losses([h[:, 1:] for h in hiddens], mask)  # {"spa", "e", "r"}: Eqs. 3-5
#     score = rauc(baseline, method, e1, e2)                 # Eq. 6, [(epoch, acc), ...]
# =================================================================================================
import math  # noqa: E402,F811  (each section lists its own imports, so it can be copied alone)
from typing import Optional, Sequence, Tuple  # noqa: E402,F811

import torch  # noqa: E402,F811
import torch.nn.functional as F  # noqa: E402,F811


def pixel_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
               kind: str = "l2") -> torch.Tensor:
    """Eq. 1: the per-patch error averaged over the masked patches only. pred, target (B, N, P)
    pixels per patch; mask (B, N) bool; kind 'l2' (MAE: squared error) or 'l1' (SimMIM)."""
    if kind not in ("l1", "l2"):
        raise ValueError(f"unknown pixel loss '{kind}': choose 'l1' or 'l2'")
    err = pred.float() - target.float()
    err = (err.abs() if kind == "l1" else err.pow(2)).mean(-1)      # (B, N)
    err = torch.where(mask, err, torch.zeros_like(err))              # a visible patch adds 0
    return err.sum() / mask.sum().clamp(min=1)


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's norm_pix_loss target: each patch (B, N, P) standardised by its own mean, variance."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def mask_ids(mask: torch.Tensor, num_masked: Optional[int] = None):
    """(B, N) bool, the same count per image -> ids of masked (B, |M|), visible (B, |V|) patches,
    each in patch order. num_masked: |M| when the caller knows it (then checked on the device)."""
    if num_masked is None:
        counts = set(mask.sum(1).tolist())
        if len(counts) > 1:
            raise ValueError("every image needs the same number of masked patches, "
                             f"got {sorted(counts)}")
        num_masked = counts.pop()
    else:
        torch._assert_async((mask.sum(1) == num_masked).all(),
                            f"every image needs exactly num_masked={num_masked} masked patches")
    order = mask.to(torch.uint8).argsort(dim=1, stable=True)  # visible (0) first, then masked
    num_visible = mask.shape[1] - num_masked
    return order[:, num_visible:], order[:, :num_visible]


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), ids (B, K) -> (B, K, D): the tokens at those positions."""
    return x.gather(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def row_entropy(queries: torch.Tensor, keys: torch.Tensor,
                exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Entropy (nats) of each row of row-softmax(Q K^T / sqrt(D)): (B, R, D), (B, C, D) -> (B, R).
    exclude (B, R, C) bool: entries left out of their row's softmax (weight exactly 0)."""
    q, k = queries.float(), keys.float()
    logits = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])         # (B, R, C)
    if exclude is None:
        return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    logits = logits.masked_fill(exclude, -math.inf)
    log_p = logits.log_softmax(-1).masked_fill(exclude, 0.0)        # 0 log 0 = 0
    return -(log_p.exp() * log_p).sum(-1)


def _check_tokens(x: torch.Tensor, mask: torch.Tensor):
    if x.dim() != 3 or x.shape[:2] != mask.shape:
        raise ValueError(f"tokens {tuple(x.shape)} do not match the mask {tuple(mask.shape)}: "
                         "pass patch tokens (B, N, D) without [cls], e.g. hiddens[l][:, 1:]")


def heterogeneity(x: torch.Tensor, mask: torch.Tensor, ids=None) -> torch.Tensor:
    """Eq. 2: H = -(1/|M|) sum_{i in M} sum_{j in V} A_ij log A_ij, A = softmax(X_M X_V^T / sqrt D).

    x (B, N, D): one layer's patch tokens, normed as the attention sees them; mask (B, N) bool,
    the same |M| per image; ids: mask_ids(mask), if known. -> H per image (B,), in [0, log |V|].
    The 1/sqrt(D) makes A attention-like; raw dot products give one-hot rows (DECISIONS.md).
    """
    _check_tokens(x, mask)
    ids_masked, ids_visible = ids if ids is not None else mask_ids(mask)
    x_masked = gather_tokens(x, ids_masked)                         # X_M (B, |M|, D)
    x_visible = gather_tokens(x, ids_visible)                       # X_V (B, |V|, D)
    return row_entropy(x_masked, x_visible).mean(-1)                # (B,)


def sparsity_loss(x: torch.Tensor, mask: torch.Tensor, ids=None,
                  exclude_self: bool = False) -> torch.Tensor:
    """Eq. 3, L_spa: entropy of the visible tokens' rows of row-softmax(X X^T / sqrt(D)).

    x (B, N, D) = X^0, the initial embedding (Algorithm 1); the columns run over all N patch
    tokens. Mean over the visible rows and the batch (the paper sums; a mean does not grow with
    N). exclude_self=True leaves each row's own column out of its softmax; the printed formula
    keeps it (the default), though the self logit dominates a token like no other (DECISIONS.md).
    """
    _check_tokens(x, mask)
    _, ids_visible = ids if ids is not None else mask_ids(mask)
    rows = gather_tokens(x, ids_visible)                            # X_V (B, |V|, D)
    exclude = None
    if exclude_self:                                                # (B, |V|, N): column = self
        exclude = F.one_hot(ids_visible, x.shape[1]).bool()
    return row_entropy(rows, x, exclude).mean()


def entropy_loss(h0: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 4, L_e = 1 / (H^0 + eps), mean over the batch h0 (B,): raise H of the embedding."""
    return (1.0 / (h0 + eps)).mean()


def ranking_loss(H: torch.Tensor, printed_sign: bool = False) -> torch.Tensor:
    """Eq. 5, L_r = sum_{l=1..L} log(1 + exp(H^l - H^{l-1})): H should decrease with depth.

    H (L+1, B) or (L+1,): H^0..H^L; sum over layers, mean over the batch. The printed Eq. 5 has
    H^{l-1} - H^l, which pushes H to *rise* with depth, against the paper's text and Fig. 1; the
    code follows the text (DECISIONS.md); printed_sign=True gives the printed formula.
    """
    step = H[1:] - H[:-1]                                           # H^l - H^{l-1}, (L, B)
    if printed_sign:
        step = -step
    return F.softplus(step).sum(0).mean()


def mto_losses(hiddens: Sequence[torch.Tensor], mask: torch.Tensor, printed_sign: bool = False,
               eps: float = 1e-6, exclude_self: bool = False,
               num_masked: Optional[int] = None) -> dict:
    """The MTO terms over X^0..X^L (each (B, N, D), patch tokens only; X^0 = initial embedding).

    -> {"spa": L_spa (Eq. 3), "e": L_e (Eq. 4), "r": L_r (Eq. 5)}, scalars the caller weights
    (L_pixel + L_spa + L_e + L_r in the paper; Table 3 switches terms off). num_masked: mask_ids'.
    """
    ids = mask_ids(mask, num_masked)                     # once for all layers
    H = torch.stack([heterogeneity(x, mask, ids) for x in hiddens])  # (L+1, B): H^0..H^L
    return {"spa": sparsity_loss(hiddens[0], mask, ids, exclude_self),
            "e": entropy_loss(H[0], eps), "r": ranking_loss(H, printed_sign)}


def rauc(s1: Sequence[Tuple[float, float]], s2: Sequence[Tuple[float, float]],
         e1: float, e2: float) -> float:
    """Eq. 6: RAUC = int_E1^E2 (S2(E) - S1(E1)) dE / int_E1^E2 (S1(E) - S1(E1)) dE.

    s1 (the baseline) and s2 (the method): [(epoch, accuracy), ...], each linear between its
    points, so the trapezoid rule on every epoch either curve has in [E1, E2] is exact. 1 = no
    gain. Not comparable with the paper's tables: on its Table 2 points this gives about twice
    the printed RAUC, and no reading of Eq. 6 we tried gives the printed values (DECISIONS.md).
    """
    if not e1 < e2:
        raise ValueError(f"RAUC needs E1 < E2, got E1={e1}, E2={e2}")
    curves = [_curve(name, s, e1, e2) for name, s in (("S1", s1), ("S2", s2))]
    knots = sorted({e1, e2} | {e for pts in curves for e, _ in pts if e1 < e < e2})

    def area(f):  # trapezoid rule over the knots
        return sum((f(a) + f(b)) / 2 * (b - a) for a, b in zip(knots, knots[1:]))

    s1_at_e1 = _linear_at(curves[0], e1)
    den = area(lambda e: _linear_at(curves[0], e) - s1_at_e1)
    if den <= 0:
        raise ValueError(f"the baseline S1 does not rise above S1(E1) = {s1_at_e1} on "
                         f"[{e1}, {e2}]: RAUC is undefined (its denominator is <= 0)")
    return area(lambda e: _linear_at(curves[1], e) - s1_at_e1) / den


def _curve(name: str, points, e1: float, e2: float):
    """[(epoch, value), ...] -> sorted, one point per epoch (the last given), covering [E1, E2]."""
    pts = sorted(dict(points).items())
    if not pts or pts[0][0] > e1 or pts[-1][0] < e2:
        span = f"{pts[0][0]}..{pts[-1][0]}" if pts else "no epochs"
        raise ValueError(f"{name} covers {span}, not [E1, E2] = [{e1}, {e2}]: no extrapolation")
    return pts


def _linear_at(pts, e: float) -> float:
    """The piecewise-linear curve through pts, at epoch e."""
    for (ea, a), (eb, b) in zip(pts, pts[1:]):
        if ea <= e <= eb:
            return a + (b - a) * (e - ea) / (eb - ea)
    return pts[0][1]  # a single point at e


# =================================================================================================
# 3. Beyond [cls]: probe heads on the frozen patch tokens (AbMILP)
#
# Paper: "Beyond [cls]: Exploring the true potential of Masked Image Modeling representations",
# Marcin Przewięźlikowski, Randall Balestriero, Wojciech Jasiński, Marek Śmieja, Bartosz
# Zieliński, arXiv:2412.03215 (ICCV 2025). AbMILP: Ilse, Tomczak, Welling, "Attention-based
# Deep Multiple Instance Learning", arXiv:1802.04712.
#
# What: a frozen MIM backbone's [cls] token is a poor summary (its attention spreads almost
# uniformly over the patches), but the patch tokens hold the information. A probe that pools the
# patch tokens with learnt attention weights (AbMILP) and then classifies linearly recovers it:
# MAE ViT-B/16 on ImageNet-1k, 67.8% ([cls] linear probe) -> 71.6% (AbMILP).
#
# A probe head pools a frozen backbone's tokens (B, 1+N, D), [cls] first, to one vector and
# classifies it with BatchNorm1d(D, affine=False) + Linear, MAE's linear probe:
#     heads = ProbeHeads(["cls", "mean", "abmilp"], dim=D, num_classes=C)
#     logits = heads(tokens)                    # {"cls": (B, C), "mean": (B, C), "abmilp": ...}
#     z, a = AbMILP(D)(tokens[:, 1:])           # pooled (B, D), attention over patches (B, N)
#     votes = knn_votes(bank, labels, feats, C) # DINO's weighted k-NN, (B, C)
#     top1, top5 = topk_correct(logits, labels) # (B,) bool each
# =================================================================================================
from typing import List, Optional, Sequence, Tuple  # noqa: E402,F811

import torch  # noqa: E402,F811
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402,F811

POOLS = ("cls", "mean", "abmilp")  # [cls], the mean of the patches, AbMILP of the patches
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}
SELF_ATTN = ("none", "map", "both")


def sincos_table(dim: int, grid: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos positions of the grid x grid patches (no [cls] row): (N, dim)."""
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = []
    for coord in (cols, rows):                                      # MAE: width first
        angles = coord.flatten().double().unsqueeze(1) * freqs.unsqueeze(0)  # (N, D/4)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


class SelfAttention(nn.Module):
    """One-head self-attention (timm names qkv / proj, so weights match a ViT attention)."""

    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:     # (B, T, D) -> (B, T, D)
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, 1, D).permute(2, 0, 3, 1, 4).unbind(0)  # (B, 1, T, D)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class AbMILP(nn.Module):
    """Attention-based MIL pooling (Ilse et al., 2018) of the patch tokens, as in Beyond [cls].

    a = softmax_i(s(x_i)), z = sum_i a_i x_i over the N patch tokens (no [cls]). The scorer s is
    w^T x + b (depth 1, the headline setting) or Linear-act-...-Linear (depth > 1). Options of
    the authors' code:
      self_attn='map'   a 1-head self-attention runs first; its output is scored, x is pooled
      self_attn='both'  its output is both scored and pooled
      pos_embed=True    the fixed 2-D sin-cos table of the grid x grid patches is added to the
                        scorer's input
    """

    def __init__(self, dim: int, *, depth: int = 1, activation: str = "tanh",
                 self_attn: str = "none", pos_embed: bool = False, grid: Optional[int] = None):
        super().__init__()
        if self_attn not in SELF_ATTN:
            raise ValueError(f"AbMILP self_attn must be one of {SELF_ATTN}, got '{self_attn}'")
        self.self_attn_mode = self_attn
        self.self_attn = SelfAttention(dim) if self_attn != "none" else None
        # a fixed table, so a buffer: it travels with the state_dict
        self.register_buffer("pos_embed", sincos_table(dim, grid) if pos_embed else None)  # (N, D)
        layers = []
        for _ in range(depth - 1):
            layers += [nn.Linear(dim, dim), ACTIVATIONS[activation]()]
        self.scorer = nn.Sequential(*layers, nn.Linear(dim, 1))  # s: R^D -> R

    def forward(self, x: torch.Tensor):
        """x: patch tokens (B, N, D) -> pooled z (B, D), attention a (B, N) summing to 1."""
        h = self.self_attn(x) if self.self_attn is not None else x  # (B, N, D)
        scored = h + self.pos_embed.to(h.dtype) if self.pos_embed is not None else h
        a = self.scorer(scored).squeeze(-1).softmax(dim=-1)          # (B, N)
        values = h if self.self_attn_mode == "both" else x
        z = (a.unsqueeze(-1) * values).sum(dim=1)                     # (B, D)
        return z, a


def pool_tokens(tokens: torch.Tensor, pool: str, abmilp: Optional[AbMILP] = None) -> torch.Tensor:
    """(B, 1+N, D), [cls] first -> (B, D): the [cls] token, the patch mean, or AbMILP of patches."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "mean":
        return tokens[:, 1:].mean(dim=1)
    if pool == "abmilp":
        return abmilp(tokens[:, 1:])[0]
    raise ValueError(f"unknown pooling '{pool}': choose one of {POOLS}")


class ProbeHead(nn.Module):
    """pool -> BatchNorm1d(D, affine=False) -> Linear(D, C): MAE's linear probe on a pooled token.

    The BN without affine standardises each feature (un-normalised ViT features sit near chance
    without it) and folds into the Linear at test time, so the probe stays linear in the pooled
    vector. Linear init as MAE: weights N(0, 0.01) truncated, bias 0.
    """

    def __init__(self, pool: str, dim: int, num_classes: int, **abmilp):
        super().__init__()
        self.pool = pool
        self.abmilp = AbMILP(dim, **abmilp) if pool == "abmilp" else None
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, 1+N, D) -> logits (B, C)
        return self.fc(self.bn(pool_tokens(tokens, self.pool, self.abmilp)))


class ProbeHeads(nn.ModuleDict):
    """Several heads on the same tokens, trained together in one pass: {pool: ProbeHead}."""

    def __init__(self, pools: Sequence[str], dim: int, num_classes: int, **abmilp):
        super().__init__({p: ProbeHead(p, dim, num_classes, **abmilp) for p in pools})

    def forward(self, tokens: torch.Tensor) -> dict:
        return {name: head(tokens) for name, head in self.items()}


def probe_loss(logits: dict, labels: torch.Tensor) -> Tuple[torch.Tensor, dict]:
    """Sum of the heads' cross-entropies (their parameters are disjoint, so each head gets exactly
    its own gradient), and the detached per-head values for the log."""
    each = {name: F.cross_entropy(out.float(), labels) for name, out in logits.items()}
    return sum(each.values()), {name: v.detach() for name, v in each.items()}


@torch.no_grad()
def knn_votes(bank: torch.Tensor, bank_labels: torch.Tensor, feats: torch.Tensor,
              num_classes: int, k: int = 20, temperature: float = 0.07, centre: bool = False,
              chunk: int = 1024) -> torch.Tensor:
    """DINO's weighted k-NN: each of the k training features most cosine-similar to a test
    feature votes for its class with weight exp(sim / T). bank (M, D), bank_labels (M,),
    feats (B, D) -> votes (B, C). centre: subtract the bank's mean feature from both sides first
    (this project's protocol, DECISIONS.md 10). Test rows go `chunk` at a time."""
    if centre:
        mean = bank.mean(0, keepdim=True)
        bank, feats = bank - mean, feats - mean
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    out = []
    for f in F.normalize(feats.float(), dim=1).split(chunk):
        sim, idx = (f @ bank.T).topk(k, dim=1)                       # (b, k)
        w = (sim / temperature).exp()
        out.append(f.new_zeros(f.shape[0], num_classes).scatter_add_(1, bank_labels[idx], w))
    return torch.cat(out)


def topk_correct(scores: torch.Tensor, labels: torch.Tensor,
                 ks: Sequence[int] = (1, 5)) -> List[torch.Tensor]:
    """Per image, is the label among the k best scores? scores (B, C), labels (B,) -> [(B,) bool].

    k is clipped to C. A score of -inf is no guess: pass k-NN votes as votes.log(), so a class no
    neighbour voted for never counts (DINO's top-5 counts such classes when k < 5).
    """
    kmax = min(max(ks), scores.shape[1])
    vals, idx = scores.float().topk(kmax, dim=1)                    # (B, kmax)
    hit = (idx == labels.unsqueeze(1)) & torch.isfinite(vals)
    return [hit[:, :min(k, kmax)].any(dim=1) for k in ks]
