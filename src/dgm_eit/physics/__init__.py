"""EIT physics: meshes, protocols, FEM forward model and Jacobian, pixel grids, torch operator."""

from dgm_eit.physics.fem import ForwardModel, forward_model_from_config
from dgm_eit.physics.grid import PixelGrid
from dgm_eit.physics.mesh import Mesh, disk_mesh, pyeit_like_mesh
from dgm_eit.physics.protocol import Protocol, make_protocol, same_pattern_protocol


def __getattr__(name):
    # the torch operator is imported lazily so numpy-only users do not pay for torch
    if name in ("EITOperator", "operator_from_config"):
        from dgm_eit.physics import operator

        return getattr(operator, name)
    raise AttributeError(f"module 'dgm_eit.physics' has no attribute {name!r}")


__all__ = ["EITOperator", "ForwardModel", "Mesh", "PixelGrid", "Protocol", "disk_mesh", "forward_model_from_config",
           "make_protocol", "operator_from_config", "pyeit_like_mesh", "same_pattern_protocol"]
