"""The Vision Transformer, the distillation student and the teachers.

Papers: DTM (arXiv:2401.00254), MTO (arXiv:2404.08330), SimMIM (arXiv:2111.09886), MAE
(arXiv:2111.06377), BEiT v2 (arXiv:2208.06366); choices they leave open: DECISIONS.md.

A hand-written ViT with timm/MAE parameter names, so weights move between this code and timm:

    vit = build_vit("vit_base", rel_pos_bias=True)   # BEiT-style relative position bias
    tokens = vit(images, mask=mask)                 # (B, 1+N, D), masked patches -> e_[M]
    latent = vit(images, keep=ids_visible)          # (B, 1+|V|, D): MAE, visible patches only
    tokens, layers = vit.forward_intermediates(images, mask=mask)  # layers.X = X^0..X^L

SimMIM(encoder) and MAE(encoder, MAEDecoder(...)) predict pixels per patch (the MTO paper's
baselines). Teachers (frozen) map the student's input batch to target tokens (B, N, C) without
[cls]: CLIPTeacher (open_clip), ViTTeacher / EMATeacher (this project's encoders), CNNTeacher
(a small supervised CNN: the default job's offline stand-in for CLIP).
"""
import copy
import math
import os
import socket
from dataclasses import dataclass, asdict
from typing import List, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from losses import gather_tokens, mask_ids, sincos_table  # one of each, in the methods' file

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the student's input normalisation (data.py uses these)
IMAGENET_STD = (0.229, 0.224, 0.225)


# -----------------------------------------------------------------------------
# Configuration

@dataclass
class ViTConfig:
    img_size: int = 224          # input side in pixels
    patch_size: int = 16         # patch side in pixels; N = (img_size / patch_size)^2
    in_chans: int = 3
    embed_dim: int = 768         # D
    depth: int = 12              # number of blocks
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    pos_embed: str = "learned"   # absolute positions: 'learned' | 'sincos' (fixed buffer) | 'none'
    rel_pos_bias: bool = False   # BEiT relative position bias, one table per block
    shared_rel_pos_bias: bool = False  # BEiT relative position bias, one table for all blocks
    layer_scale: float = 0.0     # layer-scale init value (0 = no layer scale)
    fix_init: bool = False       # BEiT: block i's attn.proj, mlp.fc2 weights / sqrt(2(i+1))
    drop_path: float = 0.0       # stochastic depth rate of the last block (linear in depth)
    num_classes: int = 0         # > 0 adds a Linear head (fine-tuning) on ...
    global_pool: str = "token"   # ... [cls] (token) | LayerNorm(mean of patch tokens) (avg, BEiT)

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2


# DTM paper, Table 12 (and a micro model for tests, a mini one for CPU experiments)
VIT_SIZES = {
    "vit_micro": dict(embed_dim=32, depth=2, num_heads=2),
    "vit_mini": dict(embed_dim=128, depth=6, num_heads=4),
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
}


def build_vit(name: str, **overrides) -> "ViT":
    """build_vit('vit_small', img_size=32, patch_size=4) -> ViT. Overrides are ViTConfig fields."""
    return ViT(ViTConfig(**{**VIT_SIZES[name], **overrides}))


# -----------------------------------------------------------------------------
# Position information

def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table with a [cls] row of zeros: (1 + grid*grid, dim)."""
    return F.pad(sincos_table(dim, grid), (0, 0, 1, 0))


def relative_position_index(grid: int) -> torch.Tensor:
    """BEiT's (1+N, 1+N) index into a table of (2g-1)^2 + 3 relative positions (timm's layout):
    patch pairs by their (dy, dx) offset, then [cls]->patch, patch->[cls], [cls]->[cls]."""
    num_dist = (2 * grid - 1) ** 2 + 3
    coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"))
    coords = coords.flatten(1)                                   # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (grid - 1)  # (N, N, 2)
    index = torch.zeros(grid * grid + 1, grid * grid + 1, dtype=torch.long)
    index[1:, 1:] = rel[..., 0] * (2 * grid - 1) + rel[..., 1]
    index[0, :] = num_dist - 3
    index[:, 0] = num_dist - 2
    index[0, 0] = num_dist - 1
    return index


class RelativePositionBias(nn.Module):
    """A BEiT relative-position-bias table, shared by all blocks (`rel_pos_bias.*` in timm)."""

    def __init__(self, grid: int, num_heads: int):
        super().__init__()
        num_dist = (2 * grid - 1) ** 2 + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_dist, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(grid),
                             persistent=False)

    def forward(self) -> torch.Tensor:  # -> (H, 1+N, 1+N)
        return lookup_bias(self.relative_position_bias_table, self.relative_position_index)


def lookup_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    n = index.shape[0]
    return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)  # (H, 1+N, 1+N)


def sdpa_bias(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(H, T, T) -> (1, H, T, T) in `dtype`, each row starting at a multiple of 8 elements
    (padded, then sliced back to T): the layout fused attention kernels read."""
    H, T, _ = bias.shape
    padded = bias.new_zeros(1, H, T, -(-T // 8) * 8, dtype=dtype)
    padded[..., :T] = bias
    return padded[..., :T]


# -----------------------------------------------------------------------------
# Blocks

class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, grid: Optional[int]):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if grid is not None:  # per-block relative position bias (timm Beit names)
            num_dist = (2 * grid - 1) ** 2 + 3
            self.relative_position_bias_table = nn.Parameter(torch.zeros(num_dist, num_heads))
            self.register_buffer("relative_position_index", relative_position_index(grid),
                                 persistent=False)
        else:
            self.relative_position_bias_table = None

    def forward(self, x, shared_bias=None, return_attn=False):
        B, T, D = x.shape  # T = 1 + N tokens
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, T, D/H)
        bias = shared_bias
        if self.relative_position_bias_table is not None:
            own = lookup_bias(self.relative_position_bias_table, self.relative_position_index)
            bias = own if bias is None else bias + own
        if bias is not None:
            bias = sdpa_bias(bias, q.dtype)  # (1, H, T, T)
        attn = None
        # written out where the maps are asked for (and for bf16 on a CPU: docs/speed.md)
        if return_attn or (q.dtype == torch.bfloat16 and q.device.type == "cpu"):
            logits = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            if bias is not None:
                logits = logits + bias
            attn = logits.softmax(dim=-1)  # (B, H, T, T)
            x = attn @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x.transpose(1, 2).reshape(B, T, D)
        return self.proj(x), attn


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample with probability p."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, grid, layer_scale, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, grid)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale > 0 else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale > 0 else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x, shared_bias=None):  # (B, T, D) -> (B, T, D), T = 1 + N tokens
        return self.forward_intermediates(x, shared_bias)[0]

    def forward_intermediates(self, x, shared_bias=None, attn=False):
        """x (B, T, D) entering the block -> (output, X^l = norm1(x), attention maps (B, H, T, T)
        if attn else None, the attention branch added to the residual stream)."""
        X = self.norm1(x)                                              # X^l
        a, maps = self.attn(X, shared_bias, return_attn=attn)
        a = self.ls1(a)                                                # the attention branch
        x = x + self.drop_path1(a)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, X, maps, a


class Layers(NamedTuple):
    """The per-layer tokens of `forward_intermediates`, l = 0..k-1 over the k blocks run; T = 1+N
    tokens ([cls] first), or 1+|V| for MAE's encoder.

    residual[l]  (B, T, D)     the residual stream entering block l (residual[0]: the embedding)
    X[l]         (B, T, D)     X^l = norm1(residual[l]), what block l's attention sees; X[k] =
                               X^L, the final-normed output: X^0..X^L as MTO takes them
    pre_norm     (B, T, D)     the last block's output, before the final norm
    attn[l]      (B, H, T, T)  block l's attention maps, rows = queries (None unless attn=True)
    attn_out[l]  (B, T, D)     its branch added to the residual stream (None unless attn=True)
    """
    residual: List[torch.Tensor]
    X: List[torch.Tensor]
    pre_norm: torch.Tensor
    attn: Optional[List[torch.Tensor]]
    attn_out: Optional[List[torch.Tensor]]


def run_blocks(blocks, x, shared_bias, final_norm: nn.Module, attn: bool = False,
               collect: bool = True):
    """Run `blocks` on the stream x (B, T, D) -> (final_norm(output), Layers). collect=False
    keeps no per-layer lists (only pre_norm). Hooks on a Block itself do not fire."""
    residual, X, maps, attn_out = [], [], [], []
    for blk in blocks:
        entering = x                                                   # entering block l
        x, X_l, maps_l, attn_out_l = blk.forward_intermediates(x, shared_bias, attn)
        if collect:
            residual.append(entering)
            X.append(X_l)
            maps.append(maps_l)
            attn_out.append(attn_out_l)
    tokens = final_norm(x)                                             # X^L, L = len(blocks)
    X = X + [tokens] if collect else X
    return tokens, Layers(residual=residual, X=X, pre_norm=x,
                          attn=maps if attn else None, attn_out=attn_out if attn else None)


# -----------------------------------------------------------------------------
# The ViT

class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"patch_size {cfg.patch_size} does not divide img_size {cfg.img_size}")
        if cfg.pos_embed not in ("learned", "sincos", "none"):
            raise ValueError(f"pos_embed '{cfg.pos_embed}' is not 'learned', 'sincos' or 'none'")
        self.cfg = cfg
        D, g = cfg.embed_dim, cfg.grid
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(cfg.in_chans, D, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))  # e_[M]
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + g * g, D))
        elif cfg.pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_pos_embed(D, g).unsqueeze(0))
        else:
            self.pos_embed = None
        self.rel_pos_bias = (RelativePositionBias(g, cfg.num_heads)
                             if cfg.shared_rel_pos_bias else None)
        dpr = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([
            Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, g if cfg.rel_pos_bias else None,
                  cfg.layer_scale, dpr[i]) for i in range(cfg.depth)])
        # avg pooling (BEiT v2 / timm fine-tuning): the final norm moves after the pooling (fc_norm)
        fc_norm = cfg.global_pool == "avg" and cfg.num_classes > 0
        self.norm = nn.Identity() if fc_norm else nn.LayerNorm(D, eps=1e-6)
        self.fc_norm = nn.LayerNorm(D, eps=1e-6) if fc_norm else None
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else None
        self.init_weights()

    def init_weights(self):
        """timm/BEiT-style init: truncated normal 0.02 for tokens, tables and Linear weights."""
        for p in (self.cls_token, self.mask_token):
            nn.init.trunc_normal_(p, std=0.02)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight  # as a Linear on flattened patches (MAE)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for name, p in self.named_parameters():
            if name.endswith("relative_position_bias_table"):
                nn.init.trunc_normal_(p, std=0.02)
        if self.cfg.fix_init:  # BEiT's rescaling: deeper residual branches start smaller
            with torch.no_grad():
                for i, blk in enumerate(self.blocks):
                    blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                    blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))

    @property
    def num_patches(self) -> int:
        return self.cfg.num_patches

    def embed(self, x, mask=None, keep=None) -> torch.Tensor:
        """Images (B, C, H, W) -> the stream entering block 0: tokens (B, 1+N, D), patches with
        mask=True as e_[M]; or for MAE's encoder (B, 1+|V|, D): [cls] and only the patches with
        ids `keep` (B, |V|), positions added, so the encoder never sees a masked patch or e_[M]."""
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        if mask is not None:                                     # mask: (B, N) bool
            w = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed.to(x.dtype)
        if keep is not None:
            x = torch.cat([x[:, :1], gather_tokens(x[:, 1:], keep)], dim=1)
        return x

    def forward(self, x, mask=None, keep=None):
        """(B, C, H, W) -> final-normed tokens (B, 1+N, D), or logits (B, classes) with a head.

        mask (B, N) bool: those patches become e_[M] (SimMIM, distillation). keep (B, |V|)
        patch ids: the encoder runs on [cls] + those patches only (MAE), so N becomes |V|.
        """
        x = self.embed(x, mask, keep)                                  # (B, 1+N, D)
        shared_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for blk in self.blocks:
            x = blk(x, shared_bias)
        x = self.norm(x)
        if self.head is None:
            return x
        if self.fc_norm is None:
            return self.head(x[:, 0])                                  # [cls]
        return self.head(self.fc_norm(x[:, 1:].mean(1)))               # LayerNorm(patch mean)

    def forward_intermediates(self, x, mask=None, keep=None, depth=None, attn=False,
                              collect=True):
        """`forward`'s tokens (B, T, D) without the head, and the `Layers` of the blocks run.

        depth: run only the first `depth` blocks (None: all); a probe of block k's output reads
        `layers.pre_norm` of depth=k+1. attn: also the attention maps and branches (explicit
        softmax). collect=False keeps no per-layer lists, only `pre_norm`.
        """
        x = self.embed(x, mask, keep)                                  # (B, T, D)
        shared_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        return run_blocks(self.blocks[:depth], x, shared_bias, self.norm, attn, collect)


# -----------------------------------------------------------------------------
# Saving, loading, and moving weights to timm

def encoder_state(model: ViT) -> dict:
    """The encoder file `pretrain.py` saves: {'config': ViTConfig dict, 'model': weights}."""
    return {"config": asdict(model.cfg), "model": model.state_dict()}


def load_encoder(path: str, **overrides) -> ViT:
    """Build a ViT from an encoder file saved by this project and load it strictly."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"encoder file '{path}' does not exist: give the encoder.pth "
                                "that pretrain.py wrote into its run directory")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"'{path}' is not an encoder saved by this project "
                         "(expected keys 'config' and 'model')")
    model = ViT(ViTConfig(**{**ckpt["config"], **overrides}))
    state = ckpt["model"]
    if model.head is None:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    model.load_state_dict(state, strict=True)
    return model


def to_timm(state_dict: dict) -> dict:
    """This project's ViT weights -> timm's (strict load), without the mask token.

    Without relative position bias: timm's `VisionTransformer` (init_values iff layer scale).
    With it: timm's `Beit`, which has q/v biases and no k bias: a k bias adds the same q.b_k to
    every logit of a query row, which softmax ignores, so dropping it is exact.
    """
    sd = {k: v for k, v in state_dict.items() if k != "mask_token"}
    if not any("relative_position_bias_table" in k for k in sd):
        return sd
    out = {}
    for k, v in sd.items():
        if k.endswith("attn.qkv.bias"):
            q, _, v_ = v.chunk(3)
            out[k.replace("qkv.bias", "q_bias")] = q
            out[k.replace("qkv.bias", "v_bias")] = v_
        else:  # every other key; layer scale becomes timm Beit's gamma_1 / gamma_2
            out[k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")] = v
    return out


def from_timm(state_dict: dict) -> dict:
    """timm `VisionTransformer` / MAE-format weights -> this project's names (inverse of to_timm
    for absolute positions). MAE checkpoints store them under 'model'."""
    sd = state_dict.get("model", state_dict)
    # MAE's mask_token belongs to its decoder (decoder width); timm's ViT has none
    return {k: v for k, v in sd.items() if not k.startswith(("decoder", "fc_norm", "mask_token"))}


# -----------------------------------------------------------------------------
# The distillation student: encoder + linear head h_theta

class DistillStudent(nn.Module):
    """u_i = h_theta(f_theta(x^M)_i): the encoder's final-normed patch tokens through a Linear."""

    def __init__(self, encoder: ViT, target_dim: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.cfg.embed_dim, target_dim)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x, mask):
        return self.head(self.encoder(x, mask)[:, 1:])  # (B, N, C)


# -----------------------------------------------------------------------------
# Pixel reconstruction: SimMIM and MAE (the MTO paper's baselines). Both return pred (B, N, p*p*C)
# and, if asked, X^0..X^L of the blocks that hold the mask tokens (for MTO).

def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """MAE's patchify: (B, C, H, W) -> (B, N, p*p*C), each patch's pixels (row, column, channel)."""
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.view(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)    # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)


class SimMIM(nn.Module):
    """Masked patches become e_[M] inside the encoder; one Linear predicts each patch's pixels.

    SimMIM's ViT head is a 1x1 conv to p*p*3 channels + PixelShuffle(p): the same Linear per patch.
    """

    def __init__(self, encoder: ViT):
        super().__init__()
        self.encoder = encoder
        c = encoder.cfg
        self.head = nn.Linear(c.embed_dim, c.patch_size ** 2 * c.in_chans)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x, mask, return_hiddens=False):
        """-> pred (B, N, p*p*C), and X^0..X^L (each (B, 1+N, D)) if return_hiddens else None."""
        if not return_hiddens:
            return self.head(self.encoder(x, mask)[:, 1:]), None
        tokens, layers = self.encoder.forward_intermediates(x, mask)   # (B, 1+N, D)
        return self.head(tokens[:, 1:]), layers.X                      # (B, N, p*p*C)


class MAEDecoder(nn.Module):
    """MAE's light decoder (MAE names): encoded visible tokens + mask tokens -> pixels per patch.

    decoder_embed maps the encoder width D to the decoder width; every masked position gets
    `mask_token`; all 1+N tokens get the fixed sin-cos `decoder_pos_embed`; `decoder_blocks`,
    `decoder_norm`, `decoder_pred` (Linear to p*p*C). MAE ViT-B: 512 wide, 8 blocks, 16 heads.
    """

    def __init__(self, *, embed_dim: int, grid: int, patch_size: int, in_chans: int = 3,
                 decoder_dim: int = 512, depth: int = 8, num_heads: int = 16,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(decoder_dim, grid).unsqueeze(0))
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_dim, num_heads, mlp_ratio, True, None, 0.0, 0.0) for _ in range(depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size ** 2 * in_chans)
        nn.init.normal_(self.mask_token, std=0.02)                     # MAE's init
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def embed_input(self, x, keep):
        """x: encoder output (B, 1+|V|, D) for the patches `keep` (B, |V|) -> the decoder's
        stream (B, 1+N, D_dec): every masked position gets e_[M], all get their positions."""
        x = self.decoder_embed(x)                                      # (B, 1+|V|, Dd)
        B, _, Dd = x.shape
        N = self.decoder_pos_embed.shape[1] - 1
        patches = self.mask_token.to(x.dtype).expand(B, N, Dd)         # every patch is e_[M] ...
        visible = keep.unsqueeze(-1).expand(-1, -1, Dd)
        patches = patches.scatter(1, visible, x[:, 1:])                # ... the visible put back
        x = torch.cat([x[:, :1], patches], dim=1)                      # (B, 1+N, Dd)
        return x + self.decoder_pos_embed.to(x.dtype)

    def forward(self, x, keep):
        """x: encoder output (B, 1+|V|, D) for the patches `keep` (B, |V|) -> pred (B, N, p*p*C)."""
        x = self.embed_input(x, keep)                                  # (B, 1+N, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x)[:, 1:])          # (B, N, p*p*C)

    def forward_intermediates(self, x, keep):
        """As `forward`, also returning the decoder's `Layers`: layers.X = X^0..X^L (B, 1+N, D_dec),
        X^0 = norm1 of the initial embedding (mask tokens + positions)."""
        x = self.embed_input(x, keep)                                  # (B, 1+N, Dd)
        tokens, layers = run_blocks(self.decoder_blocks, x, None, self.decoder_norm)
        return self.decoder_pred(tokens[:, 1:]), layers


class MAE(nn.Module):
    """The encoder sees only the visible patches; the decoder fills in mask tokens and predicts.

    X^l = the decoder's hiddens: MAE's mask tokens live only there (MTO paper, Sec. 5.2). The
    encoder's own e_[M] is never used, so it is frozen (no gradient, no DDP unused-parameter
    error); it stays in encoder.pth so the file loads into any ViT of this project.
    """

    def __init__(self, encoder: ViT, decoder: MAEDecoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        encoder.mask_token.requires_grad_(False)

    def forward(self, x, mask, return_hiddens=False, num_masked=None):
        """-> pred (B, N, p*p*C), and the decoder's X^0..X^L if return_hiddens else None.
        num_masked: the number of True per row of `mask`, if known (losses.mask_ids)."""
        _, keep = mask_ids(mask, num_masked)                           # (B, |V|) visible patch ids
        latent = self.encoder(x, keep=keep)                            # (B, 1+|V|, D)
        if not return_hiddens:
            return self.decoder(latent, keep), None
        pred, layers = self.decoder.forward_intermediates(latent, keep)
        return pred, layers.X


# -----------------------------------------------------------------------------
# Teachers

class Teacher(nn.Module):
    """Base: frozen, eval mode, no grad; bf16 autocast on CUDA; fp32 targets (B, N, C)."""

    def train(self, mode=True):  # a teacher never leaves eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, x):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
            return self.targets(x).float()


class ViTTeacher(Teacher):
    """An encoder of this project as teacher: final-normed patch tokens (B, N, D)."""

    def __init__(self, encoder: ViT):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.out_dim = encoder.cfg.embed_dim
        self.num_patches = encoder.num_patches

    def targets(self, x):
        return self.encoder(x)[:, 1:]


class EMATeacher(ViTTeacher):
    """A momentum copy of the student encoder: xi <- m * xi + (1 - m) * theta."""

    def __init__(self, student_encoder: ViT):
        super().__init__(copy.deepcopy(student_encoder))

    @torch.no_grad()
    def update(self, student_encoder: nn.Module, momentum: float):
        student = [p.detach() for p in student_encoder.parameters()]
        torch._foreach_lerp_(list(self.encoder.parameters()), student, 1.0 - momentum)


class CLIPTeacher(Teacher):
    """open_clip's visual tower as teacher: v_i = ln_post(patch token i) @ proj, (B, N, C).

    `pretrained`: an open_clip tag (e.g. 'openai') or a local weights file. The student's batch
    (ImageNet mean/std) is re-normalised with CLIP's own mean/std.
    """

    def __init__(self, model_name: str = "ViT-B-16-quickgelu", pretrained: str = "openai"):
        super().__init__()
        import open_clip
        weights = resolve_clip_weights(model_name, pretrained)
        visual = open_clip.create_model(model_name, pretrained=weights, device="cpu").visual
        self.visual = visual.eval().requires_grad_(False)
        # x_clip = (x_student * s_std + s_mean - c_mean) / c_std  = x_student * a + b
        s_mean, s_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        c_mean = torch.tensor(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
        c_std = torch.tensor(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
        self.register_buffer("scale", (s_std / c_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((s_mean - c_mean) / c_std).view(1, 3, 1, 1),
                             persistent=False)
        self.out_dim = visual.proj.shape[1]
        self.num_patches = visual.grid_size[0] * visual.grid_size[1]

    def targets(self, x):
        v = self.visual
        x = x * self.scale + self.shift
        x = v.conv1(x).flatten(2).transpose(1, 2)  # (B, N, width)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.transformer(v.ln_pre(x))
        return v.ln_post(x[:, 1:]) @ v.proj  # (B, N, C), no [cls]


def resolve_clip_weights(model_name: str, pretrained: str) -> str:
    """A local file, or an open_clip tag that can be loaded now (found in the Hugging Face cache,
    or else left to open_clip to download if the hub answers within 3 s); fail fast if neither."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache
    if os.path.isfile(pretrained):
        return pretrained
    if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise FileNotFoundError(f"CLIP weights file '{pretrained}' does not exist")
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(f"open_clip has no pretrained tag '{pretrained}' for '{model_name}'"
                         f" (known: {tags}); or give a local weights file as teacher_pretrained")
    repo, filename = os.path.split(cfg.get("hf_hub", ""))  # "org/repo/" -> default file names
    for name in (filename, "open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        path = try_to_load_from_cache(repo, name) if repo and name else None
        if isinstance(path, str) and os.path.isfile(path):
            return path
    if not _reachable("huggingface.co") and not _reachable("openaipublic.azureedge.net"):
        raise RuntimeError(f"CLIP weights '{model_name}/{pretrained}' are not cached and cannot be "
                           "downloaded (no network): download them on a machine with internet "
                           f"(open_clip.create_model('{model_name}', pretrained='{pretrained}')) "
                           "and set teacher_pretrained=/path/to/weights")
    return pretrained


def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


class SmallCNN(nn.Module):
    """Three 3x3 conv layers, two 2x2 max-pools: (B, 3, H, W) -> tokens (B, (H/4)(W/4), width).

    The default job's offline stand-in for CLIP, trained with labels (`classify` pools the
    tokens): one token per 4 x 4 px patch, a target for every patch of a ViT with patch_size 4.
    """

    def __init__(self, num_classes: int, width: int = 128, in_chans: int = 3):
        super().__init__()
        chans = [in_chans, width // 4, width // 2, width]
        layers = []
        for i in range(3):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                       nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)]
            if i < 2:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)
        self.width = width

    def forward(self, x):  # -> tokens (B, N, width)
        return self.features(x).flatten(2).transpose(1, 2)

    def classify(self, x):  # -> logits (B, classes)
        return self.fc(self.forward(x).mean(1))


class CNNTeacher(Teacher):
    """A trained SmallCNN as teacher: its feature-map tokens (B, N, width), N = (H/4)(W/4)."""

    def __init__(self, cnn: SmallCNN, img_size: int):
        super().__init__()
        self.cnn = cnn.eval().requires_grad_(False)
        self.out_dim = cnn.width
        self.num_patches = (img_size // 4) ** 2

    def targets(self, x):
        return self.cnn(x)


def load_cnn(path: str) -> SmallCNN:
    """A SmallCNN saved as {'num_classes', 'width', 'model'} (pretrain.py's teacher=cnn cache)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cnn = SmallCNN(ckpt["num_classes"], ckpt["width"])
    cnn.load_state_dict(ckpt["model"], strict=True)
    return cnn


def build_teacher(kind: str, student_encoder: Optional[ViT] = None,
                  clip_model: str = "ViT-B-16-quickgelu", pretrained: str = "openai") -> Teacher:
    """kind 'clip' (open_clip name + tag or file), 'checkpoint' (pretrained = an encoder file of
    this project), 'ema' (a momentum copy of `student_encoder`) or 'cnn' (a SmallCNN file)."""
    if kind == "clip":
        return CLIPTeacher(clip_model, pretrained)
    if kind == "checkpoint":  # a fine-tuned classifier works too: its head is dropped
        return ViTTeacher(load_encoder(pretrained, num_classes=0))
    if kind == "ema":
        return EMATeacher(student_encoder)
    if kind == "cnn":
        return CNNTeacher(load_cnn(pretrained), student_encoder.cfg.img_size)
    raise ValueError(f"unknown teacher '{kind}': choose 'clip', 'checkpoint', 'ema' or 'cnn'")
