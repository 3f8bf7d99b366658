"""KTC2023 real-data study: tank model, phantoms, simulated training data, segmentation, the challenge run."""

# the methods of the study, in report order, and their display names; every trained one
# (cvae, cnf, csd) also has a seed ensemble "<key>-ens" when run.seeds > 1
METHODS = ("linear", "gn", "cvae", "cnf", "csd")
TRAINED = ("cvae", "cnf", "csd")
ENSEMBLE_SUFFIX = "-ens"
METHOD_NAMES = {"linear": "linearised", "gn": "GN", "cvae": "CVAE", "cnf": "CNF", "csd": "CSD*"}
METHOD_NAMES.update({m + ENSEMBLE_SUFFIX: METHOD_NAMES[m] + " ens" for m in TRAINED})
ALL_METHODS = tuple(x for m in METHODS for x in ((m, m + ENSEMBLE_SUFFIX) if m in TRAINED else (m,)))

from dgm_eit.simulators import register_simulator  # noqa: E402

# the pipeline makes a config's data set with the simulator of the study whose section it
# holds; a location, not the class, so that importing the package stays light
register_simulator("ktc", "tank", "dgm_eit.ktc.simulate:KTCSimulator")
