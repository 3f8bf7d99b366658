"""Invertible building blocks of the conditional normalizing flow (:mod:`dgm_eit.models.cnf`).

Every block maps ``x -> y`` with ``forward(x, cond, rev=False)`` and returns ``(y, logdet)``
where ``logdet`` (B,) is ``log|det dy/dx|`` of the direction that was run (so the inverse
returns the negative of the forward value). Blocks work in any floating dtype, which the
log-determinant test uses to compare against a brute-force float64 Jacobian.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def soft_clamp(s: torch.Tensor, clamp: float) -> torch.Tensor:
    """Bound log-scales to (-clamp, clamp) smoothly; unbounded scales make training blow up."""
    return clamp * (2.0 / math.pi) * torch.atan(s / clamp)


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    # the sign fix makes q Haar-distributed instead of biased by the QR convention
    return (q * torch.sign(torch.diagonal(r))).float()


def _haar_matrix(channels: int) -> torch.Tensor:
    """Orthonormal Haar transform of each channel's 2x2 patch, in pixel_unshuffle's order.

    ``pixel_unshuffle`` lays out channel ``c``'s patch ``[[a, b], [c, d]]`` at indices
    ``4c .. 4c+3``; the rows below give average, horizontal, vertical and diagonal details.
    """
    h = 0.5 * torch.tensor([[1.0, 1.0, 1.0, 1.0],
                            [1.0, -1.0, 1.0, -1.0],
                            [1.0, 1.0, -1.0, -1.0],
                            [1.0, -1.0, -1.0, 1.0]])
    return torch.block_diag(*[h] * channels)


class InvertibleDownsampling(nn.Module):
    """Space-to-depth (C,H,W) -> (4C,H/2,W/2) followed by an orthogonal channel transform.

    The transform starts as the Haar wavelet and, when ``learned``, is the Haar matrix times
    ``exp(A - A^T)``: always orthogonal, so the step stays exactly invertible and its
    log-determinant is 0.
    """

    def __init__(self, in_channels: int, learned: bool = True):
        super().__init__()
        self.in_channels = in_channels
        n = 4 * in_channels
        self.register_buffer("haar", _haar_matrix(in_channels))
        self.skew = nn.Parameter(torch.zeros(n, n)) if learned else None

    def weight(self) -> torch.Tensor:
        if self.skew is None:
            return self.haar
        a = self.skew - self.skew.T
        return torch.linalg.matrix_exp(a.to(self.haar.dtype)) @ self.haar

    def forward(self, x, cond=None, rev: bool = False):
        w = self.weight().to(x.dtype)
        zero = x.new_zeros(x.shape[0])
        if not rev:
            y = F.pixel_unshuffle(x, 2)
            return torch.einsum("oc,bchw->bohw", w, y), zero
        y = torch.einsum("oc,bohw->bchw", w, x)  # w is orthogonal: its inverse is w^T
        return F.pixel_shuffle(y, 2), zero


class ActNorm(nn.Module):
    """Per-channel affine map initialised from the first training batch (zero mean, unit std).

    Works on images (B,C,H,W) and on vectors (B,C).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialised", torch.tensor(False))

    def _shape(self, x):
        return (1, -1) + (1,) * (x.dim() - 2)

    @torch.no_grad()
    def _initialise(self, x):
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims)
        std = x.std(dim=dims) if x.numel() // x.shape[1] > 1 else torch.ones_like(mean)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank saw another batch; without this the replicas would start apart
            stats = torch.stack([mean, std])
            torch.distributed.all_reduce(stats)
            mean, std = stats / torch.distributed.get_world_size()
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std.clamp_min(1e-3)))
        self.initialised.fill_(True)

    def forward(self, x, cond=None, rev: bool = False):
        if not rev and self.training and not bool(self.initialised):
            self._initialise(x)
        shape = self._shape(x)
        pixels = x[0, 0].numel()
        logdet = (self.log_scale.sum() * pixels).to(x.dtype).expand(x.shape[0])
        if not rev:
            return (x + self.bias.view(shape)) * torch.exp(self.log_scale).view(shape), logdet
        return x * torch.exp(-self.log_scale).view(shape) - self.bias.view(shape), -logdet


class ChannelMixing(nn.Module):
    """Invertible 1x1 convolution (or dense map on vectors), orthogonal at initialisation.

    ``learned=False`` keeps a fixed random orthogonal matrix (log-determinant 0), as in the
    reference code; ``learned=True`` trains it (GLOW) and pays a slogdet per call.
    """

    def __init__(self, channels: int, learned: bool = False):
        super().__init__()
        w = random_orthogonal(channels)
        if learned:
            self.weight = nn.Parameter(w)
        else:
            self.register_buffer("weight", w)
        self.learned = learned

    def forward(self, x, cond=None, rev: bool = False):
        w = self.weight.to(x.dtype)
        if self.learned:
            pixels = x[0, 0].numel()
            logdet = (torch.linalg.slogdet(w)[1] * pixels).expand(x.shape[0])
        else:
            logdet = x.new_zeros(x.shape[0])
        if rev:
            w = torch.linalg.inv(w) if self.learned else w.T
            logdet = -logdet
        if x.dim() == 2:
            return x @ w.T, logdet
        return torch.einsum("oc,bchw->bohw", w, x), logdet


def _conv_subnet(c_in: int, c_out: int, hidden: int) -> nn.Sequential:
    net = nn.Sequential(
        nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(),
        nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
        nn.Conv2d(hidden, c_out, 3, padding=1),
    )
    _zero_last(net)
    return net


def _dense_subnet(c_in: int, c_out: int, hidden: int) -> nn.Sequential:
    net = nn.Sequential(
        nn.Linear(c_in, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, c_out),
    )
    _zero_last(net)
    return net


def _zero_last(net: nn.Sequential) -> None:
    # a block that starts as the identity keeps the deep flow stable at the start of training
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)


class ConditionalAffineCoupling(nn.Module):
    """GLOW-style coupling (both halves updated) conditioned on a feature map or a vector.

    ``x = [x1, x2]``; ``y2 = x2 * exp(s2(x1, c)) + t2(x1, c)``, then
    ``y1 = x1 * exp(s1(y2, c)) + t1(y2, c)``, with soft-clamped log-scales.
    ``cond_channels = 0`` makes it unconditional. Images (B,C,H,W) use 3x3 convolutions,
    vectors (B,C) use an MLP (``dense=True``).
    """

    def __init__(self, channels: int, cond_channels: int, hidden: int, clamp: float = 1.5,
                 dense: bool = False):
        super().__init__()
        if channels < 2:
            raise ValueError("a coupling block needs at least 2 channels")
        self.split = channels // 2
        self.rest = channels - self.split
        self.clamp = clamp
        make = _dense_subnet if dense else _conv_subnet
        self.net2 = make(self.split + cond_channels, 2 * self.rest, hidden)
        self.net1 = make(self.rest + cond_channels, 2 * self.split, hidden)

    def _scale_shift(self, net, x, cond):
        h = net(x if cond is None else torch.cat([x, cond], dim=1))
        s, t = h.chunk(2, dim=1)
        return soft_clamp(s, self.clamp), t

    @staticmethod
    def _sum(s):
        return s.flatten(1).sum(dim=1)

    def forward(self, x, cond=None, rev: bool = False):
        a, b = x[:, :self.split], x[:, self.split:]
        if not rev:
            s2, t2 = self._scale_shift(self.net2, a, cond)
            b = b * torch.exp(s2) + t2
            s1, t1 = self._scale_shift(self.net1, b, cond)
            a = a * torch.exp(s1) + t1
            return torch.cat([a, b], dim=1), self._sum(s1) + self._sum(s2)
        s1, t1 = self._scale_shift(self.net1, b, cond)
        a = (a - t1) * torch.exp(-s1)
        s2, t2 = self._scale_shift(self.net2, a, cond)
        b = (b - t2) * torch.exp(-s2)
        return torch.cat([a, b], dim=1), -(self._sum(s1) + self._sum(s2))


class Permutation(nn.Module):
    """Fixed random permutation of the features of a vector (B,D); log-determinant 0.

    Used between dense couplings instead of an orthogonal matrix, whose D x D buffer would
    dominate the model's size for the paper's 2048-dimensional rest.
    """

    def __init__(self, features: int):
        super().__init__()
        perm = torch.randperm(features)
        self.register_buffer("perm", perm)
        self.register_buffer("inverse", torch.argsort(perm))

    def forward(self, x, cond=None, rev: bool = False):
        return x[:, self.inverse if rev else self.perm], x.new_zeros(x.shape[0])


class FlowStep(nn.Module):
    """ActNorm -> invertible mixing -> conditional coupling (one GLOW step)."""

    def __init__(self, channels: int, cond_channels: int, hidden: int, clamp: float,
                 dense: bool = False, learned_mixing: bool = False):
        super().__init__()
        self.layers = nn.ModuleList([
            ActNorm(channels),
            Permutation(channels) if dense else ChannelMixing(channels, learned=learned_mixing),
            ConditionalAffineCoupling(channels, cond_channels, hidden, clamp, dense=dense),
        ])

    def forward(self, x, cond=None, rev: bool = False):
        logdet = x.new_zeros(x.shape[0])
        for layer in (reversed(self.layers) if rev else self.layers):
            x, ld = layer(x, cond, rev=rev)
            logdet = logdet + ld
        return x, logdet
