"""What the tank supplies to run the registered methods (:class:`dgm_eit.methods.StudyPhysics`):
its classical reconstructions (the linearised step, and Gauss-Newton on the same posterior with
its iteration count and prior chosen on validation), the linearised image the trained methods
take, and CSD*'s data term (the linearised model, :mod:`dgm_eit.ktc.posterior`) for the
``dds`` sampler. It knows no method by name: a method says which of these it needs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dgm_eit.errors import InputError

# the key under which a method's choice records the data term it sampled with
DATA_TERM_KEY = "linear_model"


def recorded_linear_model(chosen: dict) -> dict | None:
    """The data term's fit as ``methods.json`` recorded it when a method that samples with it had
    its settings chosen (the same fit for every seed and method: it depends on the data set
    only); None when no method recorded one."""
    for record in chosen.values():
        for choice in record.get("seeds", [record]):
            if DATA_TERM_KEY in choice:
                return choice[DATA_TERM_KEY]
    return None


class TankPhysics:
    """The tank's reconstructions for the difference data of one study (``cfg`` with the
    linearised step's settings applied); ``data``: the study's data set, on whose training
    split the data term is fitted when ``linear_model`` (its recorded fit) is None."""

    classical_kinds = ("linear", "gn")
    data_term_samplers = ("dds",)

    def __init__(self, cfg: dict, data: Path, linear_model: dict | None = None):
        from dgm_eit.ktc.simulate import KTCSimulator

        self.cfg, self.data = cfg, Path(data)
        self.sim = KTCSimulator(cfg)
        self.linear_model = linear_model
        self._recons: dict[float, object] = {}
        self._fidelity = None
        self._kinds = {"linear": (self._linear, self._linear_candidates), "gn": (self._gn, self._gn_candidates)}

    def recon(self, prior_std: float | None = None):
        """The difference reconstructor of the data set's prior, or of another prior std (GN's own)."""
        if prior_std is None or prior_std == self.sim.recon.prior_std:
            return self.sim.recon
        if prior_std not in self._recons:
            from dgm_eit.ktc.tank import DifferenceReconstructor

            self._recons[prior_std] = DifferenceReconstructor(self.sim.tank, prior_std, self.sim.recon.corr_length)
        return self._recons[prior_std]

    def gn_path(self, dv, masks, counts, prior_std: float | None = None) -> dict[int, np.ndarray]:
        """GN images after each count in ``counts`` (one run to the largest)."""
        return self.recon(prior_std).gauss_newton_path(dv, masks, counts)

    def classical_image(self, dv: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """The linearised image of each row: what the data set's ``gn`` holds for its samples."""
        return np.stack([self.sim.recon.linear(d, m) for d, m in zip(dv, masks)])

    def extra_images(self, dv: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """(N, K, H, W): what the data set's ``gn_extra`` holds for its samples."""
        return self.sim.extra(dv, masks)

    def classical(self, kind: str, dv, masks, settings: dict) -> np.ndarray:
        return self._kind(kind)[0](dv, masks, settings)

    def candidates(self, kind: str, dv, masks) -> list[tuple[dict, np.ndarray]]:
        """``(settings, images)`` of every setting of a classical reconstruction tried on validation."""
        return self._kind(kind)[1](dv, masks)

    def _kind(self, kind: str):
        if kind not in self._kinds:
            raise InputError(f"the tank makes no {kind!r} reconstruction; it makes {', '.join(self._kinds)}")
        return self._kinds[kind]

    def _linear(self, dv, masks, settings):
        return self.classical_image(dv, masks)

    def _linear_candidates(self, dv, masks):
        return [({}, self.classical_image(dv, masks))]

    def _gn(self, dv, masks, settings):
        its = int(settings.get("iterations", max(self.cfg["iterated"]["iterations"])))
        return self.gn_path(dv, masks, [its], settings.get("prior_std"))[its]

    def _gn_candidates(self, dv, masks):
        # GN gets its own prior: iterating changes which weight is best
        base, iterated = self.sim.recon.prior_std, self.cfg["iterated"]
        out = []
        for scale in iterated["prior_scale"]:
            paths = self.gn_path(dv, masks, iterated["iterations"], base * float(scale))
            out += [({"iterations": k, "prior_std": base * float(scale)}, images) for k, images in paths.items()]
        return out

    @property
    def fidelity(self):
        """CSD*'s linearised data term: its gain and error level as the study recorded them, or
        fitted on the training split."""
        if self._fidelity is None:
            from dgm_eit.ktc.posterior import LinearisedFidelity, fit_linear_model

            if self.linear_model is None:
                if not self.data.is_file():
                    raise InputError(f"there is no {self.data} to fit the linearised data term on, and the study's "
                                     "methods.json records none; re-run the dgm-eit run command that made it")
                from dgm_eit.data.storage import read_split

                train = read_split(self.data, "train", keys=("sigma", "v_clean"))
                n = min(len(train["sigma"]), int(self.cfg["csd_dds"]["fit_samples"]))
                self.linear_model = fit_linear_model(self.sim.recon, train["sigma"][:n], train["v_clean"][:n])
            self._fidelity = LinearisedFidelity(self.sim.recon, self.linear_model["gain"],
                                                self.linear_model["error_scale"])
        return self._fidelity

    def sample(self, model, start, dv, masks, settings: dict, seed: int) -> dict:
        """A score prior's samples from ``start`` with the linearised data term; ``settings``: the
        sampling settings (the ``[csd]`` keys, ``sampler`` and ``n_samples`` included)."""
        from dgm_eit.ktc.posterior import sample_dds

        if settings["sampler"] not in self.data_term_samplers:
            raise InputError(f"the tank has a data term for {', '.join(self.data_term_samplers)} only, "
                             f"not for the sampler {settings['sampler']!r}")
        return sample_dds(model, start, dv, masks, self.fidelity, settings, seed=seed)

    def data_term_record(self) -> dict:
        """What a choice made with the data term records of it (read back by :func:`recorded_linear_model`)."""
        self.fidelity   # fitted now if it was not yet
        return {DATA_TERM_KEY: self.linear_model}
