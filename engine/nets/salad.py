"""SALAD aggregation (optimal-transport VLAD), written from the paper's equations.

SALAD (Izquierdo & Civera, CVPR 2024) scores every patch token against ``m`` clusters, turns the
scores into a soft assignment with a few Sinkhorn iterations (plus a "dustbin" that absorbs
uninformative tokens), sums per-cluster projected features weighted by that assignment, and appends
a projected global (CLS) token. The original code is GPL: this is an independent implementation.
Module and parameter names follow the published checkpoints so that their state dicts load as-is:
``token_features.{0,2}``, ``cluster_features.{0,3}``, ``score.{0,3}``, ``dust_bin``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SaladConfig:
    """Shapes of a SALAD head. Defaults are AstroLoc/MegaLoc's; SALAD's own uses cluster_dim=128."""

    num_channels: int = 768
    num_clusters: int = 64
    cluster_dim: int = 256
    token_dim: int = 256
    mlp_dim: int = 512
    dropout: float = 0.3

    @property
    def out_dim(self) -> int:
        return self.num_clusters * self.cluster_dim + self.token_dim


def _conv_mlp(in_ch: int, hidden: int, out_ch: int, dropout: float) -> nn.Sequential:
    # Index layout (0 conv, 1 dropout, 2 relu, 3 conv) is what the checkpoints' keys expect.
    return nn.Sequential(
        nn.Conv2d(in_ch, hidden, 1), nn.Dropout(dropout), nn.ReLU(), nn.Conv2d(hidden, out_ch, 1)
    )


def sinkhorn_log_assignment(scores: torch.Tensor, dust_bin: torch.Tensor, iters: int = 3) -> torch.Tensor:
    """Log of the token-to-cluster transport plan, dustbin row included: (B, m, n) -> (B, m+1, n).

    Marginals: each of the n tokens carries mass 1/(n+m); each of the m clusters receives 1/(n+m) and
    the dustbin the remaining (n-m)/(n+m). The plan is rescaled by (n+m) so that every token's
    column sums to 1 (a soft assignment). Requires n > m.
    """
    b, m, n = scores.shape
    dust = dust_bin.to(scores.dtype).reshape(1, 1, 1).expand(b, 1, n)
    cost = torch.cat([scores, dust], dim=1)  # (B, m+1, n)
    log_norm = -math.log(n + m)
    log_a = [log_norm] * m + [log_norm + math.log(n - m)]
    log_a = torch.tensor(log_a, dtype=scores.dtype, device=scores.device).reshape(1, m + 1, 1)
    log_b = torch.full((1, 1, n), log_norm, dtype=scores.dtype, device=scores.device)
    u = torch.zeros_like(cost[:, :, :1])  # (B, m+1, 1)
    v = torch.zeros_like(cost[:, :1, :])  # (B, 1, n)
    for _ in range(iters):
        u = log_a - torch.logsumexp(cost + v, dim=2, keepdim=True)
        v = log_b - torch.logsumexp(cost + u, dim=1, keepdim=True)
    return cost + u + v - log_norm


class SALAD(nn.Module):
    """(patch feature map (B, C, h, w), CLS token (B, C)) -> (B, token_dim + m * cluster_dim), L2-normalised.

    Layout of the output (matters for the linear layer of a trained checkpoint): the normalised token
    first, then the cluster block flattened feature-major, i.e. index ``token_dim + d * m + k`` holds
    feature ``d`` of cluster ``k``.
    """

    def __init__(self, config: SaladConfig | None = None) -> None:
        super().__init__()
        cfg = config or SaladConfig()
        if cfg.num_clusters < 1 or cfg.cluster_dim < 1 or cfg.token_dim < 1:
            raise ValueError(f"invalid SALAD config {cfg}")
        self.config = cfg
        self.token_features = nn.Sequential(
            nn.Linear(cfg.num_channels, cfg.mlp_dim), nn.ReLU(), nn.Linear(cfg.mlp_dim, cfg.token_dim)
        )
        self.cluster_features = _conv_mlp(cfg.num_channels, cfg.mlp_dim, cfg.cluster_dim, cfg.dropout)
        self.score = _conv_mlp(cfg.num_channels, cfg.mlp_dim, cfg.num_clusters, cfg.dropout)
        self.dust_bin = nn.Parameter(torch.tensor(1.0))

    @property
    def out_dim(self) -> int:
        return self.config.out_dim

    def forward(self, features: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        n = features.shape[-2] * features.shape[-1]
        if n <= self.config.num_clusters:
            raise ValueError(
                f"SALAD needs more patches ({n}) than clusters ({self.config.num_clusters}): use a larger input"
            )
        local = self.cluster_features(features).flatten(2)  # (B, l, n)
        scores = self.score(features).flatten(2)  # (B, m, n)
        assign = sinkhorn_log_assignment(scores, self.dust_bin).exp()[:, :-1, :]  # drop the dustbin
        clusters = torch.matmul(local, assign.transpose(1, 2))  # (B, l, m)
        clusters = F.normalize(clusters, p=2, dim=1).flatten(1)
        glob = F.normalize(self.token_features(token), p=2, dim=-1)
        return F.normalize(torch.cat([glob, clusters], dim=-1), p=2, dim=-1)
