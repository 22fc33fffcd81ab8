"""Diffusion Transformer (DiT) velocity network for latent K-Flow.

Follows the DiT recipe (Peebles & Xie, 2023): patchify, fixed 2-D sin-cos position embedding, transformer blocks
with adaLN-Zero conditioning on (time, class), a zero-initialised final layer. Differences: the time input is the
K-Flow scaling parameter t ∈ [0, 1] (the K-amplitude "time"), and the output has ``in_channels`` channels (a
velocity or an x1-prediction; no learned variance).

Shapes: x [N, C, H, W], t [N], y [N] (class ids; ``num_classes`` is the null / dropped class).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kflow.core.embedding import sinusoidal_embedding

__all__ = ["DiT", "DiT_models", "TimestepEmbedder", "LabelEmbedder"]


def modulate(x, shift, scale):
    """x [N, T, D], shift/scale [N, D]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """t ∈ [0, 1] -> [N, hidden]: sinusoidal features of 1000·t, then an MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        return self.mlp(sinusoidal_embedding(t, self.frequency_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class ids -> [N, hidden]; the extra row ``num_classes`` is the null class used for classifier-free guidance.
    During training labels are replaced by the null class with probability ``dropout_prob``."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, y, train: bool):
        if train and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.table(y)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # [N, T, D]
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)  # [N, heads, T, D/heads]
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class DiTBlock(nn.Module):
    """Pre-norm transformer block; adaLN-Zero: c -> (shift, scale, gate) for attention and MLP, gates start at 0."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding [grid², dim]: half the channels encode rows, half columns."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    return np.concatenate([one_axis(dim // 2, rows), one_axis(dim // 2, cols)], axis=1)


class DiT(nn.Module):
    """DiT over [N, C, H, W] latents (H = W = input_size) with patch size p: T = (H/p)² tokens of width hidden_size.

    Args:
        num_classes: 0 for unconditional; else class ids 0..num_classes-1 and the null class num_classes.
        class_dropout_prob: label dropout for classifier-free guidance.
        gradient_checkpointing: recompute block activations in backward (saves memory).
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, num_classes: int = 0,
                 class_dropout_prob: float = 0.1, gradient_checkpointing: bool = False):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads or hidden_size % 4:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads} and by 4")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.num_classes, self.gradient_checkpointing = num_classes, gradient_checkpointing
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        grid = input_size // patch_size
        self.register_buffer("pos_embed", torch.from_numpy(sincos_pos_embed_2d(hidden_size, grid)).float()[None],
                             persistent=False)  # [1, T, D], fixed
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        def basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(basic)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for m in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def unpatchify(self, x):
        """[N, T, p²·C] -> [N, C, H, W]."""
        p, c = self.patch_size, self.in_channels
        g = self.input_size // p
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x, t, y=None):
        """x [N, C, H, W], t [N] in [0, 1], y [N] class ids (None: unconditional / null class) -> [N, C, H, W]."""
        if x.shape[1:] != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(f"DiT expects [N, {self.in_channels}, {self.input_size}, {self.input_size}], "
                             f"got {tuple(x.shape)}")
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # [N, T, D]
        c = self.t_embedder(t.to(x.dtype).expand(x.shape[0]) if t.dim() == 0 else t)
        if self.y_embedder is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            c = c + self.y_embedder(y, self.training)
        for block in self.blocks:
            h = checkpoint(block, h, c, use_reentrant=False) if (self.gradient_checkpointing and self.training) \
                else block(h, c)
        return self.unpatchify(self.final_layer(h, c))

    def forward_with_cfg(self, x, t, y, cfg_scale: float = 1.0):
        """Classifier-free guidance: v = v(x, t, ∅) + s · (v(x, t, y) − v(x, t, ∅)); s = 1 is the conditional model.
        One batched forward pass over [cond; uncond] (2N samples); unconditional models and y=None ignore s."""
        if self.y_embedder is None or y is None or cfg_scale == 1.0:
            return self.forward(x, t, y)
        both = self.forward(torch.cat([x, x]), torch.cat([t, t]) if t.dim() else t,
                            torch.cat([y, torch.full_like(y, self.num_classes)]))
        cond, uncond = both.chunk(2)
        return uncond + cfg_scale * (cond - uncond)


_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6),
          "T": (6, 192, 3), "M": (4, 128, 4)}  # T (tiny) and M (mini) are CPU sizes


def _builder(depth, hidden, heads, patch):
    def build(**kwargs):
        return DiT(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, **kwargs)

    return build


DiT_models = {f"DiT-{name}/{p}": _builder(d, h, n, p) for name, (d, h, n) in _SIZES.items() for p in (1, 2, 4, 8)
              if not (p == 1 and name in ("XL", "L", "B"))}
