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

def _bipartite_merge(sums, r):
    """One ToMe step on a batch of T current tokens: merge the r best A->B pairs.

    sums (B, T, C): sum of the original target tokens each current token stands for (the cosine
    of a sum equals the cosine of the mean, so the group sizes are not needed). A = even
    positions, B = odd positions. Returns the new sums and new_pos (B, T): where each current
    token goes in the new list of T - r tokens.
    """
    Bsz, T, C = sums.shape
    feats = F.normalize(sums, dim=-1)                        # directions of the group means
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
    sums_b = sums_b.scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, C), sums_a.gather(1, src.unsqueeze(-1).expand(-1, -1, C)))
    new_sums = torch.cat([sums_a.gather(1, unm.unsqueeze(-1).expand(-1, -1, C)), sums_b], dim=1)
    return new_sums, new_pos


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
    assign = torch.arange(N, device=target.device).expand(B, N)  # current token of each original
    tokens, carry = N, 0
    schedule = morph_schedule(N, num_morphed, num_iters)
    while schedule or carry:
        want = (schedule.pop(0) if schedule else 0) + carry
        r = min(want, (tokens + 1) // 2)
        carry = want - r
        if r == 0:
            continue
        sums, new_pos = _bipartite_merge(sums, r)
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


# -----------------------------------------------------------------------------
# Masked Token Optimization (MTO paper)
#
# The baselines' pixel loss (Eq. 1) and the three MTO terms over X^0..X^L, the per-layer patch
# tokens (B, N, D) of the blocks that hold the mask tokens (SimMIM: the encoder; MAE: the
# decoder), layer 0 = the initial embedding, each normed as its attention sees it (NOTES.md 2):
#     loss = pixel_loss(pred, patchify(img, p), mask, "l1")        # SimMIM; MAE: "l2" on
#                                                                  #   normalize_patches(target)
#     H = heterogeneity(x, mask)                                   # Eq. 2, (B,) in [0, log |V|]
#     terms = mto_losses([h[:, 1:] for h in hiddens], mask)        # {"spa", "e", "r"}: Eqs. 3-5
#     score = rauc(baseline, method, e1, e2)                       # Eq. 6, [(epoch, acc), ...]

from model import gather_tokens, mask_ids  # noqa: E402  (this section's own imports)


def pixel_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Eq. 1: the per-patch error averaged over the masked patches only; visible patches never count.

    pred, target (B, N, P) pixels per patch; mask (B, N) bool. kind 'l2' (MAE: mean squared
    error) or 'l1' (SimMIM: mean absolute error, over the masked pixels and channels).
    """
    if kind not in ("l1", "l2"):
        raise ValueError(f"unknown pixel loss '{kind}': choose 'l1' or 'l2'")
    err = pred.float() - target.float()
    err = (err.abs() if kind == "l1" else err.pow(2)).mean(-1)      # (B, N)
    err = torch.where(mask, err, torch.zeros_like(err))              # a visible patch adds exactly 0
    return err.sum() / mask.sum().clamp(min=1)


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's norm_pix_loss target: each patch (B, N, P) standardised by its own mean and variance."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def row_entropy(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row of row-softmax(Q K^T / sqrt(D)): (B, R, D) x (B, C, D) -> (B, R)."""
    q, k = queries.float(), keys.float()
    logits = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])         # (B, R, C)
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def _check_tokens(x: torch.Tensor, mask: torch.Tensor):
    if x.dim() != 3 or x.shape[:2] != mask.shape:
        raise ValueError(f"tokens {tuple(x.shape)} do not match the mask {tuple(mask.shape)}: "
                         "pass patch tokens (B, N, D) without [cls], e.g. hiddens[l][:, 1:]")


def heterogeneity(x: torch.Tensor, mask: torch.Tensor, ids=None) -> torch.Tensor:
    """Eq. 2: H = -(1/|M|) sum_{i in M} sum_{j in V} A_ij log A_ij, A = row-softmax(X_M X_V^T / sqrt(D)).

    x (B, N, D): one layer's patch tokens, normed as the attention sees them (the model's
    hiddens); mask (B, N) bool, the same |M| per image. -> H per image (B,), in [0, log |V|]:
    log |V| when every masked token is equally similar to all visible ones. The 1/sqrt(D) makes
    A an attention-like affinity (NOTES.md); raw dot products of wide tokens give one-hot rows.
    ids: mask_ids(mask), when the caller already has them (one host read for all layers).
    """
    _check_tokens(x, mask)
    ids_masked, ids_visible = ids if ids is not None else mask_ids(mask)
    x_m, x_v = gather_tokens(x, ids_masked), gather_tokens(x, ids_visible)  # X_M (B,|M|,D), X_V (B,|V|,D)
    return row_entropy(x_m, x_v).mean(-1)                           # (B,)


def sparsity_loss(x: torch.Tensor, mask: torch.Tensor, ids=None) -> torch.Tensor:
    """Eq. 3, L_spa: entropy of the visible tokens' rows of row-softmax(X X^T / sqrt(D)).

    x (B, N, D) = X^0, the initial embedding (Algorithm 1); the columns run over all N patch
    tokens. Mean over the visible rows and the batch (the paper sums; NOTES.md: a mean, so the
    scale does not depend on N). Low entropy = each visible row puts its weight on few tokens.
    """
    _check_tokens(x, mask)
    _, ids_visible = ids if ids is not None else mask_ids(mask)
    return row_entropy(gather_tokens(x, ids_visible), x).mean()      # rows X_V (B,|V|,D), columns X


def entropy_loss(h0: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 4, L_e = 1 / (H^0 + eps): raise the heterogeneity of the initial embedding. h0 (B,) -> mean."""
    return (1.0 / (h0 + eps)).mean()


def ranking_loss(H: torch.Tensor, printed_sign: bool = False) -> torch.Tensor:
    """Eq. 5, L_r = sum_{l=1..L} log(1 + exp(H^l - H^{l-1})): H should decrease with depth.

    H (L+1, B) or (L+1,): H^0..H^L. The printed Eq. 5 has log(1 + exp(H^{l-1} - H^l)), which
    pushes H to *increase* with depth, against the paper's own text and Fig. 1 ("heterogeneity
    ... gradually decreases in subsequent layers") and Sec. 4 ("progressively lower
    heterogeneity"). NOTES.md decides for the decreasing order; printed_sign=True gives the
    formula as printed. Sum over layers, mean over the batch.
    """
    step = H[1:] - H[:-1]                                           # H^l - H^{l-1}, (L, B)
    if printed_sign:
        step = -step
    return F.softplus(step).sum(0).mean()


def mto_losses(hiddens: Sequence[torch.Tensor], mask: torch.Tensor, printed_sign: bool = False,
               eps: float = 1e-6) -> dict:
    """The MTO terms over X^0..X^L (each (B, N, D), patch tokens only; X^0 = initial embedding).

    -> {"spa": L_spa (Eq. 3), "e": L_e (Eq. 4), "r": L_r (Eq. 5)}, scalars; the caller weights
    them (total = L_pixel + lambda * (L_spa + L_e + L_r), lambda = 1; Table 3 switches terms off).
    """
    ids = mask_ids(mask)                                            # one host read for all layers
    H = torch.stack([heterogeneity(x, mask, ids) for x in hiddens])  # (L+1, B): H^0..H^L
    return {"spa": sparsity_loss(hiddens[0], mask, ids), "e": entropy_loss(H[0], eps),
            "r": ranking_loss(H, printed_sign)}


def rauc(s1: Sequence[Tuple[float, float]], s2: Sequence[Tuple[float, float]], e1: float, e2: float) -> float:
    """Eq. 6: RAUC(S1, S2; E1, E2) = int_E1^E2 (S2(E) - S1(E1)) dE / int_E1^E2 (S1(E) - S1(E1)) dE.

    s1 (the baseline) and s2 (the method): [(epoch, accuracy), ...]. Each curve is linear
    between its points; both integrals use the trapezoid rule on every epoch either curve has
    in [E1, E2] (exact for such curves). 1 = no gain; > 1 = more area above S1(E1) than the baseline.
    """
    if not e1 < e2:
        raise ValueError(f"RAUC needs E1 < E2, got E1={e1}, E2={e2}")
    curves = []
    for name, s in (("S1", s1), ("S2", s2)):
        pts = sorted(dict(s).items())                               # one point per epoch (the last given)
        if not pts or pts[0][0] > e1 or pts[-1][0] < e2:
            span = f"{pts[0][0]}..{pts[-1][0]}" if pts else "no epochs"
            raise ValueError(f"{name} covers {span}, not [E1, E2] = [{e1}, {e2}]: no extrapolation")
        curves.append(pts)

    def at(pts, e):  # the piecewise-linear curve through pts, at epoch e
        for (ea, a), (eb, b) in zip(pts, pts[1:]):
            if ea <= e <= eb:
                return a + (b - a) * (e - ea) / (eb - ea)
        return pts[0][1]  # a single point at e

    knots = sorted({e1, e2} | {e for pts in curves for e, _ in pts if e1 < e < e2})

    def area(f):
        return sum((f(a) + f(b)) / 2 * (b - a) for a, b in zip(knots, knots[1:]))

    s1_at_e1 = at(curves[0], e1)
    den = area(lambda e: at(curves[0], e) - s1_at_e1)
    if den <= 0:
        raise ValueError(f"the baseline S1 does not rise above S1(E1) = {s1_at_e1} on [{e1}, {e2}]: "
                         "RAUC is undefined (its denominator is <= 0)")
    return area(lambda e: at(curves[1], e) - s1_at_e1) / den


# -----------------------------------------------------------------------------
# Patch-aggregation heads (Beyond [cls])
#
# A frozen backbone gives tokens (B, 1+N, D), [cls] first. A probe head pools them to one vector
# and classifies it with BatchNorm1d(D, affine=False) + Linear, MAE's linear probe:
#     heads = ProbeHeads(["cls", "mean", "abmilp"], dim=D, num_classes=C)
#     logits = heads(tokens)                          # {"cls": (B, C), "mean": (B, C), "abmilp": ...}
#     z, a = AbMILP(D)(tokens[:, 1:])                 # pooled (B, D), attention over patches (B, N)
#     votes = knn_votes(bank, bank_labels, feats, C)  # DINO's weighted k-NN, (B, C)
#     top1, top5 = topk_correct(logits, labels)       # (B,) bool each

import torch.nn as nn  # noqa: E402  (this section's own imports)

from model import Attention, sincos_pos_embed  # noqa: E402

POOLS = ("cls", "mean", "abmilp")  # what a probe head reads: [cls], mean of patches, AbMILP of patches
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}
SELF_ATTN = ("none", "map", "both")


class AbMILP(nn.Module):
    """Attention-based MIL pooling (Ilse et al., 2018) of the patch tokens, as in Beyond [cls].

    a = softmax_i(s(x_i)), z = sum_i a_i x_i over the N patch tokens (no [cls]). The scorer s is
    w^T x + b (depth 1, the headline setting) or Linear-act-...-Linear (depth > 1). Options of
    the authors' code:
      self_attn='map'   a 1-head self-attention runs first; its output is scored, x is pooled
      self_attn='both'  its output is both scored and pooled
      pos_embed=True    the fixed 2-D sin-cos table is added to the scorer's input (needs `grid`)
    """

    def __init__(self, dim: int, *, depth: int = 1, activation: str = "tanh", self_attn: str = "none",
                 pos_embed: bool = False, grid: Optional[int] = None):
        super().__init__()
        if self_attn not in SELF_ATTN:
            raise ValueError(f"AbMILP self_attn must be one of {SELF_ATTN}, got '{self_attn}'")
        if activation not in ACTIVATIONS:
            raise ValueError(f"AbMILP activation must be one of {sorted(ACTIVATIONS)}, got '{activation}'")
        if depth < 1:
            raise ValueError(f"AbMILP depth must be >= 1, got {depth}")
        if pos_embed and grid is None:
            raise ValueError("AbMILP(pos_embed=True) needs the patch grid side `grid`")
        self.self_attn_mode = self_attn
        self.self_attn = Attention(dim, num_heads=1, qkv_bias=True, grid=None) if self_attn != "none" else None
        if pos_embed:  # a fixed table, so a buffer: it travels with the state_dict
            self.register_buffer("pos_embed", sincos_pos_embed(dim, grid)[1:])  # (N, D), no [cls] row
        else:
            self.pos_embed = None
        layers = []
        for _ in range(depth - 1):
            layers += [nn.Linear(dim, dim), ACTIVATIONS[activation]()]
        self.scorer = nn.Sequential(*layers, nn.Linear(dim, 1))  # s: R^D -> R

    def forward(self, x: torch.Tensor):
        """x: patch tokens (B, N, D) -> pooled z (B, D), attention a (B, N) summing to 1."""
        h = self.self_attn(x)[0] if self.self_attn is not None else x  # (B, N, D)
        scored = h if self.self_attn_mode in ("map", "both") else x
        if self.pos_embed is not None:
            scored = scored + self.pos_embed.to(scored.dtype)
        a = self.scorer(scored).squeeze(-1).softmax(dim=-1)          # (B, N)
        values = h if self.self_attn_mode == "both" else x
        z = (a.unsqueeze(-1) * values).sum(dim=1)                     # (B, D)
        return z, a


def pool_tokens(tokens: torch.Tensor, pool: str, abmilp: Optional[AbMILP] = None) -> torch.Tensor:
    """(B, 1+N, D) with [cls] first -> (B, D): the [cls] token, the patch mean, or AbMILP of patches."""
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
        if pool not in POOLS:
            raise ValueError(f"unknown pooling '{pool}': choose one of {POOLS}")
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
def knn_votes(bank: torch.Tensor, bank_labels: torch.Tensor, feats: torch.Tensor, num_classes: int,
              k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """DINO's weighted k-NN: each of the k training features most cosine-similar to a test feature
    votes for its class with weight exp(sim / T). bank (M, D), bank_labels (M,), feats (B, D) ->
    votes (B, C). Test rows go in chunks, so memory is chunk x M similarities, never B x M."""
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    out = []
    for f in F.normalize(feats.float(), dim=1).split(chunk):
        sim, idx = (f @ bank.T).topk(k, dim=1)                       # (b, k)
        w = (sim / temperature).exp()
        votes = f.new_zeros(f.shape[0], num_classes).scatter_add_(1, bank_labels[idx], w)
        out.append(votes)                                            # (b, C)
    return torch.cat(out)


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> List[torch.Tensor]:
    """Per image, is the label among the k best scores? scores (B, C), labels (B,) -> [(B,) bool].

    k is clipped to C (top-5 with 3 classes is top-3). A score of -inf is no guess: pass k-NN
    votes as votes.log(), so a class no neighbour voted for never counts (DINO's top-5 counts
    such classes when fewer than 5 classes got votes, e.g. whenever k < 5).
    """
    kmax = min(max(ks), scores.shape[1])
    vals, idx = scores.float().topk(kmax, dim=1)                    # (B, kmax)
    hit = (idx == labels.unsqueeze(1)) & torch.isfinite(vals)
    return [hit[:, :min(k, kmax)].any(dim=1) for k in ks]
