"""KTC2023 real-data study: tank model, phantoms, simulated training data, segmentation, the challenge run.
Its methods are the registered ones (:mod:`dgm_eit.methods`); the tank supplies their physics
(:mod:`dgm_eit.ktc.physics`)."""

from dgm_eit.simulators import register_simulator

# the pipeline makes a config's data set with the simulator of the study whose section it
# holds; a location, not the class, so that importing the package stays light
register_simulator("ktc", "tank", "dgm_eit.ktc.simulate:KTCSimulator")
