"""Classical EIT reconstructions (Gauss-Newton family, one-step linearised)."""

from dgm_eit.recon.gauss_newton import GNResult, gauss_newton, gn_config, linear_difference

__all__ = ["GNResult", "gauss_newton", "gn_config", "linear_difference"]
