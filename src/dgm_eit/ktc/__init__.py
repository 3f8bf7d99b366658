"""KTC2023 real-data study: tank model, phantoms, simulated training data, segmentation, the challenge run."""
