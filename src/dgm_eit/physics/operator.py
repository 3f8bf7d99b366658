"""Differentiable EIT forward operator for PyTorch.

``EITOperator(fm, grid)`` maps images (B, H, W) or (B, 1, H, W) -- or element values
(B, m) -- to voltages (B, M). The physics runs in float64 numpy on the CPU; the result
comes back in the input's dtype and device (CUDA tensors are moved to the CPU for the
solve). Backward is the vector-Jacobian product ``grad_v @ J`` at the current
conductivity, mapped back through the (linear) pixel -> element averaging.

``min_sigma`` (optional) clamps element conductivities from below before the solve, so a
sampler's intermediate images with non-positive values still have a forward; the
gradient is zero where the clamp is active.
"""

from __future__ import annotations

import numpy as np
import torch

from dgm_eit.errors import InputError
from dgm_eit.physics.fem import ForwardModel
from dgm_eit.physics.grid import PixelGrid


class _ForwardFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sigma: torch.Tensor, fm: ForwardModel, min_sigma):
        s = sigma.detach().to("cpu", torch.float64).numpy()
        active = np.ones_like(s, dtype=bool)
        if min_sigma is not None:
            active = s > min_sigma
            s = np.maximum(s, min_sigma)
        need_grad = ctx.needs_input_grad[0]
        vs, Js = [], []
        for row in s:
            if need_grad:
                v, J = fm.jacobian(row)
                Js.append(J)
            else:
                v = fm.forward(row)
            vs.append(v)
        if need_grad:
            ctx.save_for_backward(torch.from_numpy(np.stack(Js)), torch.from_numpy(active))
        ctx.out_dtype, ctx.out_device = sigma.dtype, sigma.device
        return torch.from_numpy(np.stack(vs)).to(device=sigma.device, dtype=sigma.dtype)

    @staticmethod
    def backward(ctx, grad_v):
        J, active = ctx.saved_tensors
        g = grad_v.detach().to("cpu", torch.float64)
        grad = torch.einsum("bk,bke->be", g, J) * active
        return grad.to(device=ctx.out_device, dtype=ctx.out_dtype), None, None


class EITOperator(torch.nn.Module):
    """Images or element conductivities -> voltages, differentiable (see module doc)."""

    def __init__(self, fm: ForwardModel, grid: PixelGrid | None = None, min_sigma: float | None = None):
        super().__init__()
        self.fm = fm
        self.grid = grid
        self.min_sigma = None if min_sigma is None else float(min_sigma)
        if grid is not None:
            same = grid.mesh is fm.mesh or (
                grid.mesh.nodes.shape == fm.mesh.nodes.shape and grid.mesh.elements.shape == fm.mesh.elements.shape
                and np.array_equal(grid.mesh.nodes, fm.mesh.nodes) and np.array_equal(grid.mesh.elements, fm.mesh.elements))
            if not same:
                raise InputError("the pixel grid was built on a different mesh than the forward model")
            T = grid.element_matrix.tocoo()
            indices = torch.from_numpy(np.stack([T.row, T.col]).astype(np.int64))
            # not a buffer: Module.to(dtype) must not round the averaging weights; one
            # float64 copy is kept per device instead
            self._to_elements = {torch.device("cpu"): torch.sparse_coo_tensor(
                indices, torch.from_numpy(T.data), T.shape, check_invariants=True).coalesce()}

    @property
    def n_meas(self) -> int:
        return self.fm.n_meas

    def elements(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B,H,W)/(B,1,H,W) or element values (B,m) -> element values (B,m), differentiable."""
        m = self.fm.n_elements
        if x.ndim == 2 and x.shape[-1] == m:
            return x
        if self.grid is None:
            raise InputError(f"expected element values of shape (B, {m}); build EITOperator with a PixelGrid for images")
        H, W = self.grid.shape
        if x.ndim == 4 and x.shape[1] == 1:
            x = x[:, 0]
        if x.ndim != 3 or tuple(x.shape[-2:]) != (H, W):
            raise InputError(f"expected images of shape (B, {H}, {W}) or (B, 1, {H}, {W}), got {tuple(x.shape)}")
        flat = x.reshape(x.shape[0], H * W).to(torch.float64)
        T = self._to_elements.get(flat.device)
        if T is None:
            T = self._to_elements[flat.device] = self._to_elements[torch.device("cpu")].to(flat.device)
        return torch.sparse.mm(T, flat.T).T.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x):
            raise InputError("EITOperator expects a torch tensor")
        sigma = self.elements(x)
        if not torch.isfinite(sigma).all():
            raise InputError("conductivity contains NaN or inf")
        return _ForwardFunction.apply(sigma, self.fm, self.min_sigma)


def operator_from_config(config: dict, image_size: int, min_sigma: float | None = None) -> EITOperator:
    """The differentiable operator of a resolved config's ``[mesh]`` on an ``image_size`` grid."""
    from dgm_eit.physics.fem import forward_model_from_config

    fm = forward_model_from_config(config, "mesh")
    return EITOperator(fm, PixelGrid(fm.mesh, size=int(image_size)), min_sigma=min_sigma)
