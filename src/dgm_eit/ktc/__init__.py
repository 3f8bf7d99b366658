"""KTC2023 real-data study: tank model, phantoms, simulated training data, segmentation, the challenge run."""

# the methods of the study, in report order, and their display names
METHODS = ("linear", "gn", "cvae", "cnf", "csd")
METHOD_NAMES = {"linear": "linearised", "gn": "GN", "cvae": "CVAE", "cnf": "CNF", "csd": "CSD*"}
