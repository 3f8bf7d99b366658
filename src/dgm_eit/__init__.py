"""dgm-eit: electrical impedance tomography with deep generative priors."""

__version__ = "0.1.0"
