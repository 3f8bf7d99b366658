"""Data sets: analytic phantoms, measurement noise, the HDF5 file, the simulator.

Light imports only here (numpy, h5py); the simulator pulls in the physics when used.
"""

from dgm_eit.data.storage import (ARRAY_KEYS, FORMAT_VERSION, SPLITS, dataset_config, open_dataset,
                                  read_split, split_sizes)


def __getattr__(name):
    if name == "simulate_dataset":
        from dgm_eit.data.simulate import simulate_dataset

        return simulate_dataset
    raise AttributeError(name)


__all__ = ["ARRAY_KEYS", "FORMAT_VERSION", "SPLITS", "dataset_config", "open_dataset",
           "read_split", "simulate_dataset", "split_sizes"]
