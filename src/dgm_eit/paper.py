"""The paper's study as data: its tests and tables, and the numbers it published.

:data:`TESTS` is the study's plan (:data:`PAPER_CITATION`, its section 4.3): T1 = high SNR, 2
and 4 anomalies (paper Tables 1, 2); T2 = low SNR, 2 and 4 anomalies (Tables 3, 4), the
score prior still trained on the high-SNR set; T3 = models trained on 4 anomalies / high
SNR, tested on 2 anomalies at both SNRs (Tables 5, 6).

:data:`PAPER_RESULTS` holds the paper's Tables 1-6 (mean, std over its test sets) as
printed; they are reference data, not results of this code. Two oddities of the source
are kept as printed: Table 3's CSD* row repeats the CNF row from SSIM on, and Tables 5-6
(Test 3) have no GN row, so the paper's relative MSE change there is taken against the
GN row of the table with the same test set (Table 1 for 2 anomalies / 40 dB, Table 3 for
2 anomalies / 25 dB), which is the same reconstruction.
"""

from __future__ import annotations

from dgm_eit.errors import InputError
from dgm_eit.metrics import METRICS
from dgm_eit.results import DataSpec, Setting

# The study this package reproduces. The extracted paper text we worked from carries neither
# authors nor venue; they come from the arXiv listing and the journal's catalogue record.
PAPER_CITATION = ("H. Wang, G. Xu and Q. Zhou, \"A comparative study of variational autoencoders, normalizing "
                  "flows, and score-based diffusion models for electrical impedance tomography\", Journal of "
                  "Inverse and Ill-posed Problems 32(4):795-813, 2024, doi:10.1515/jiip-2023-0037 "
                  "(preprint arXiv:2310.15831)")

# test -> (report heading, its tables as (paper table, training set, test set)); a set is
# (anomalies, noise), the noise being [run] high_snr_db or low_snr_db
TESTS: dict[str, tuple[str, tuple[tuple[int, tuple[int, str], tuple[int, str]], ...]]] = {
    "T1": ("Test 1: low noise", ((1, (2, "high"), (2, "high")), (2, (4, "high"), (4, "high")))),
    "T2": ("Test 2: high noise", ((3, (2, "low"), (2, "low")), (4, (4, "low"), (4, "low")))),
    "T3": ("Test 3: generalisation (trained on 4 anomalies)",
           ((5, (4, "high"), (2, "high")), (6, (4, "high"), (2, "low")))),
}


def settings_for(cfg: dict) -> list[Setting]:
    """The tables selected by ``[run] tests``, in the paper's order."""
    run = cfg["run"]
    unknown = [t for t in run["tests"] if t not in TESTS]
    if unknown:
        raise InputError(f"run.tests: unknown test(s) {unknown}; choose from {', '.join(TESTS)}")
    snr_db = {"high": float(run["high_snr_db"]), "low": float(run["low_snr_db"])}

    def spec(anomalies: int, noise: str) -> DataSpec:
        return DataSpec(anomalies, snr_db[noise])

    return [Setting(test, spec(*train), spec(*data), table)
            for test, (_, tables) in TESTS.items() if test in run["tests"]
            for table, train, data in tables]


def _row(*values: float) -> dict[str, tuple[float, float]]:
    return {m: (values[2 * i], values[2 * i + 1]) for i, m in enumerate(METRICS)}


# paper table number -> method -> metric -> (mean, std); Wang, Xu and Zhou 2024, Tables 1-6
PAPER_RESULTS: dict[int, dict[str, dict[str, tuple[float, float]]]] = {
    1: {  # Test 1: 2 anomalies, 40 dB
        "GN": _row(0.0032, 0.0004, 28.850, 0.675, 0.874, 0.011, 0.034, 0.003, 0.026, 0.002, 1.045, 0.066),
        "CVAE": _row(0.0014, 0.0005, 32.804, 1.631, 0.969, 0.008, 0.009, 0.002, 0.007, 0.001, 1.058, 0.022),
        "CNF": _row(0.0011, 0.0005, 33.789, 2.715, 0.969, 0.007, 0.008, 0.001, 0.006, 0.001, 0.920, 0.020),
        "CSD*": _row(0.0015, 0.0006, 32.673, 4.670, 0.976, 0.009, 0.006, 0.002, 0.005, 0.001, 1.001, 0.002),
    },
    2: {  # Test 1: 4 anomalies, 40 dB
        "GN": _row(0.0140, 0.006, 26.317, 1.034, 0.794, 0.047, 0.061, 0.015, 0.078, 0.019, 1.199, 0.107),
        "CVAE": _row(0.0121, 0.004, 26.282, 1.507, 0.882, 0.019, 0.033, 0.006, 0.042, 0.008, 1.110, 0.068),
        "CNF": _row(0.0040, 0.003, 30.981, 2.764, 0.962, 0.021, 0.014, 0.006, 0.011, 0.005, 0.752, 0.044),
        "CSD*": _row(0.0070, 0.004, 28.217, 2.499, 0.952, 0.025, 0.014, 0.007, 0.011, 0.006, 1.000, 0.004),
    },
    3: {  # Test 2: 2 anomalies, 25 dB (CSD* prior trained on 40 dB)
        "GN": _row(0.0067, 0.0009, 24.271, 0.992, 0.804, 0.018, 0.059, 0.004, 0.046, 0.003, 0.891, 0.068),
        "CVAE": _row(0.0035, 0.0015, 28.996, 1.812, 0.945, 0.014, 0.014, 0.004, 0.011, 0.003, 1.062, 0.025),
        "CNF": _row(0.0063, 0.0014, 25.652, 2.807, 0.932, 0.019, 0.018, 0.006, 0.014, 0.005, 0.933, 0.131),
        "CSD*": _row(0.0060, 0.0025, 25.453, 2.807, 0.932, 0.019, 0.018, 0.006, 0.014, 0.005, 0.933, 0.132),
    },
    4: {  # Test 2: 4 anomalies, 25 dB (CSD* prior trained on 40 dB)
        "GN": _row(0.0164, 0.003, 24.752, 1.018, 0.747, 0.031, 0.092, 0.012, 0.072, 0.009, 1.108, 0.129),
        "CVAE": _row(0.0134, 0.005, 25.838, 1.416, 0.868, 0.023, 0.044, 0.010, 0.035, 0.007, 1.104, 0.031),
        "CNF": _row(0.0093, 0.004, 26.839, 1.760, 0.922, 0.019, 0.026, 0.007, 0.020, 0.006, 0.631, 0.065),
        "CSD*": _row(0.0100, 0.004, 26.347, 1.768, 0.928, 0.022, 0.020, 0.009, 0.016, 0.007, 0.999, 0.002),
    },
    5: {  # Test 3: trained on 4 anomalies / 40 dB, tested on 2 anomalies / 40 dB
        "CVAE": _row(0.0061, 0.0028, 27.965, 1.209, 0.919, 0.013, 0.027, 0.007, 0.021, 0.005, 1.262, 0.192),
        "CNF": _row(0.0008, 0.0004, 35.031, 2.691, 0.973, 0.006, 0.008, 0.001, 0.006, 0.001, 0.805, 0.041),
        "CSD*": _row(0.0015, 0.0009, 34.082, 7.267, 0.966, 0.023, 0.008, 0.004, 0.006, 0.003, 1.003, 0.005),
    },
    6: {  # Test 3: trained on 4 anomalies / 40 dB, tested on 2 anomalies / 25 dB
        "CVAE": _row(0.0149, 0.006, 24.459, 1.628, 0.870, 0.030, 0.048, 0.014, 0.038, 0.011, 1.313, 0.198),
        "CNF": _row(0.0074, 0.0023, 25.067, 1.388, 0.903, 0.018, 0.024, 0.005, 0.019, 0.004, 0.596, 0.094),
        "CSD*": _row(0.0064, 0.0024, 24.747, 2.809, 0.918, 0.024, 0.021, 0.007, 0.016, 0.005, 0.903, 0.153),
    },
}

# Test 3 tables have no GN row: the same GN reconstruction is in the table with that test set
PAPER_GN_TABLE = {1: 1, 2: 2, 3: 3, 4: 4, 5: 1, 6: 3}

# the paper's model sizes, counted in the authors' public code, by the model they belong to (efficiency table)
PAPER_PARAMETERS = {"cvae": 0.94e6, "cnf": 4.8e6, "score": 4.1e6}


def paper_mse_change(table: int, method: str) -> float | None:
    """The paper's relative MSE change of ``method`` against GN in ``table``, in percent."""
    rows = PAPER_RESULTS.get(table, {})
    if method not in rows:
        return None
    gn = PAPER_RESULTS[PAPER_GN_TABLE[table]]["GN"]["MSE"][0]
    return 100.0 * (rows[method]["MSE"][0] - gn) / gn
