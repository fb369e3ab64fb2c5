"""Point-Bind's 3D encoder: a PointBERT-style transformer over local point groups (REFERENCE.md section 3).

xyz (B, N, 3) -> farthest point sampling picks ``num_group`` centres -> each centre's ``group_size`` nearest
points, re-centred -> a shared mini-PointNet turns each group into one token -> transformer (the centre's
position embedding re-added before every block) -> concat(CLS, max over group tokens) -> ``pc_projection``.

Module and parameter names follow the official checkpoint (``point_trunk.point_encoder.*``); the 1x1 Conv1d and
BatchNorm layers keep their reference types so the file layout (trailing kernel axis, running stats) is exact,
but run channel-last as plain matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ibllm.config import PointConfig
from ibllm.encoders.layers import DropPath, Mlp, drop_path_rates, init_linear

# Widths fixed by the reference (not configurable there): mini-PointNet 3->128->256, 512->512->encoder_dims,
# and the centre position MLP 3->128->trans_dim.
_FIRST_HIDDEN, _FIRST_OUT, _SECOND_HIDDEN, _POS_HIDDEN = 128, 256, 512, 128
_EPS = 1e-5  # LayerNorm and BatchNorm eps everywhere inside the point encoder


# ----------------------------------------------------------------------------------------------------------
# Grouping


@dataclass
class PointGroups:
    """The local neighbourhoods the encoder sees. Indices refer to rows of the input cloud."""

    center: Tensor  # (B, G, 3) FPS centres
    fps_idx: Tensor  # (B, G) int64, FPS order (column 0 = start point)
    knn_idx: Tensor  # (B, G, K) int64, the K nearest points of each centre (order unspecified)
    neighborhood: Tensor  # (B, G, K, 3) those points minus their centre


def farthest_point_sample(xyz: Tensor, num_samples: int, start: Tensor | None = None) -> Tensor:
    """Indices (B, num_samples) of iterative farthest point sampling.

    Each step takes the point whose squared distance to the nearest chosen centre is largest (first index on
    ties). ``start`` (B,) gives the first centre; the default is index 0, so the result is deterministic (the
    reference draws it with ``torch.randint(0, N, (B,))``). Vectorised over batch and points; the loop runs over
    the centres only. Distances are computed as sum((x - c)^2) like the reference, so indices match it exactly.
    """
    b, n, _ = xyz.shape
    if not 0 < num_samples <= n:
        raise ValueError(f"cannot pick {num_samples} centres from {n} points")
    xyz = xyz.float()
    idx = torch.empty(b, num_samples, dtype=torch.long, device=xyz.device)
    nearest = torch.full((b, n), 1e10, dtype=xyz.dtype, device=xyz.device)
    farthest = (torch.zeros(b, dtype=torch.long, device=xyz.device) if start is None
                else start.to(device=xyz.device, dtype=torch.long).reshape(b))
    rows = torch.arange(b, device=xyz.device)
    for i in range(num_samples):
        idx[:, i] = farthest
        dist = ((xyz - xyz[rows, farthest].unsqueeze(1)) ** 2).sum(-1)
        torch.minimum(nearest, dist, out=nearest)
        farthest = nearest.argmax(-1)
    return idx


def knn_indices(xyz: Tensor, centers: Tensor, k: int) -> Tensor:
    """Indices (B, G, k) of the k nearest points of every centre (squared Euclidean as |c|^2 + |x|^2 - 2cx).

    The expanded form is the reference's; it is kept so that near-ties at the k-th neighbour resolve the same way.
    """
    dist = -2 * torch.matmul(centers, xyz.transpose(1, 2))
    dist += (centers**2).sum(-1).unsqueeze(-1)
    dist += (xyz**2).sum(-1).unsqueeze(1)
    return dist.topk(k, dim=-1, largest=False, sorted=False).indices


def group_points(xyz: Tensor, num_group: int, group_size: int, fps_start: Tensor | None = None) -> PointGroups:
    """FPS centres, their kNN groups and the re-centred neighbourhoods of a batch of clouds (B, N, 3).

    Computed in float32 whatever the model dtype: distances in half precision would change which points are picked.
    """
    if xyz.ndim != 3 or xyz.shape[-1] != 3:
        raise ValueError(f"point clouds must be (B, N, 3), got {tuple(xyz.shape)}")
    if xyz.shape[1] < group_size:
        raise ValueError(f"a cloud needs at least group_size={group_size} points, got {xyz.shape[1]}")
    xyz = xyz.float()
    fps_idx = farthest_point_sample(xyz, num_group, fps_start)
    rows = torch.arange(xyz.shape[0], device=xyz.device).unsqueeze(-1)
    center = xyz[rows, fps_idx]
    knn_idx = knn_indices(xyz, center, group_size)
    neighborhood = xyz[rows.unsqueeze(-1), knn_idx] - center.unsqueeze(2)
    return PointGroups(center=center, fps_idx=fps_idx, knn_idx=knn_idx, neighborhood=neighborhood)


# ----------------------------------------------------------------------------------------------------------
# Encoder


def _pointwise(layer: nn.Module, x: Tensor) -> Tensor:
    """Apply a Conv1d(kernel 1) or BatchNorm1d of the reference to channel-last features (..., C)."""
    if isinstance(layer, nn.Conv1d):
        return F.linear(x, layer.weight.squeeze(-1), layer.bias)
    if isinstance(layer, nn.BatchNorm1d):
        # Statistics per channel over all other axes: the same as the reference's (BG, C, K) layout.
        return layer(x.reshape(-1, x.shape[-1])).view_as(x)
    return layer(x)


class MiniPointNet(nn.Module):
    """One token per group: shared point MLP, max-pool, concat [global, per point], MLP, max-pool."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.out_dim = out_dim
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, _FIRST_HIDDEN, 1), nn.BatchNorm1d(_FIRST_HIDDEN, eps=_EPS), nn.ReLU(inplace=True),
            nn.Conv1d(_FIRST_HIDDEN, _FIRST_OUT, 1),
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(2 * _FIRST_OUT, _SECOND_HIDDEN, 1), nn.BatchNorm1d(_SECOND_HIDDEN, eps=_EPS),
            nn.ReLU(inplace=True), nn.Conv1d(_SECOND_HIDDEN, out_dim, 1),
        )

    def forward(self, groups: Tensor) -> Tensor:
        b, g, k, _ = groups.shape
        x = groups.reshape(b * g, k, 3)
        for layer in self.first_conv:
            x = _pointwise(layer, x)
        pooled = x.amax(dim=1, keepdim=True)
        # The reference concatenates [global, per point] (512 channels) and applies a 1x1 conv. Splitting that
        # weight column-wise gives the same sum while the global half is multiplied once per group instead of
        # once per point: a third fewer multiply-adds in the whole point encoder.
        conv = self.second_conv[0]
        w = conv.weight.squeeze(-1)
        x = F.linear(x, w[:, _FIRST_OUT:], conv.bias) + F.linear(pooled, w[:, :_FIRST_OUT])
        for layer in self.second_conv[1:]:
            x = _pointwise(layer, x)
        return x.amax(dim=1).view(b, g, self.out_dim)


class PointAttention(nn.Module):
    """Point-BERT attention: bias-free fused ``qkv``, output ``proj`` with bias."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"point width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class PointBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_EPS)
        self.attn = PointAttention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=_EPS)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PointBlocks(nn.Module):
    """Holds the blocks under ``blocks.blocks.<i>`` (the reference's TransformerEncoder wrapper)."""

    def __init__(self, dim: int, depth: int, num_heads: int, drop_path: float):
        super().__init__()
        self.blocks = nn.ModuleList(PointBlock(dim, num_heads, p) for p in drop_path_rates(drop_path, depth))

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x + pos)  # position embedding re-added before every block
        return x


class PointTransformer(nn.Module):
    """Groups -> tokens -> transformer -> concat(CLS, max over groups): (B, 2 * trans_dim)."""

    def __init__(self, cfg: PointConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.trans_dim
        self.encoder = MiniPointNet(cfg.encoder_dims)
        self.reduce_dim = nn.Linear(cfg.encoder_dims, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Sequential(nn.Linear(3, _POS_HIDDEN), nn.GELU(), nn.Linear(_POS_HIDDEN, d))
        self.blocks = PointBlocks(d, cfg.depth, cfg.num_heads, cfg.drop_path)
        self.norm = nn.LayerNorm(d, eps=_EPS)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.apply(init_linear)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.cls_pos, std=0.02)

    def group(self, xyz: Tensor, fps_start: Tensor | None = None) -> PointGroups:
        return group_points(xyz, self.cfg.num_group, self.cfg.group_size, fps_start)

    def encode_groups(self, groups: PointGroups) -> Tensor:
        dtype = self.reduce_dim.weight.dtype
        tokens = self.reduce_dim(self.encoder(groups.neighborhood.to(dtype)))
        b = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(b, -1, -1), self.pos_embed(groups.center.to(dtype))], dim=1)
        x = self.norm(self.blocks(x, pos))
        return torch.cat([x[:, 0], x[:, 1:].amax(dim=1)], dim=-1)

    def forward(self, xyz: Tensor, fps_start: Tensor | None = None) -> Tensor:
        return self.encode_groups(self.group(xyz, fps_start))


@dataclass
class PointFeatures:
    """Every intermediate of one point-trunk call (what parity compares)."""

    groups: PointGroups
    point_feat: Tensor  # (B, 2 * trans_dim) transformer output
    pc_embed: Tensor  # (B, proj_dim) point_feat @ pc_projection: the input of the point head


class PointBindTrunk(nn.Module):
    """``point_trunk``: the point transformer followed by Point-Bind's projection matrix (2 * trans_dim, P)."""

    def __init__(self, cfg: PointConfig):
        super().__init__()
        self.cfg = cfg
        self.point_encoder = PointTransformer(cfg)
        self.pc_projection = nn.Parameter(torch.empty(2 * cfg.trans_dim, cfg.proj_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.point_encoder.reset_parameters()
        nn.init.normal_(self.pc_projection, std=self.cfg.proj_dim**-0.5)

    def features(self, xyz: Tensor, fps_start: Tensor | None = None) -> PointFeatures:
        groups = self.point_encoder.group(xyz, fps_start)
        point_feat = self.point_encoder.encode_groups(groups)
        return PointFeatures(groups=groups, point_feat=point_feat, pc_embed=point_feat @ self.pc_projection)

    def forward(self, xyz: Tensor, fps_start: Tensor | None = None) -> Tensor:
        return self.point_encoder(xyz, fps_start) @ self.pc_projection
