"""Tables, CSV and figures of an experiment run, and the paper's published numbers to compare with.

:data:`PAPER_RESULTS` holds the paper's Tables 1-6 (mean, std over its test sets) as
printed; they are reference data, not results of this code. Two oddities of the source
are kept as printed: Table 3's CSD* row repeats the CNF row from SSIM on, and Tables 5-6
(Test 3) have no GN row, so the paper's relative MSE change there is taken against the
GN row of the table with the same test set (Table 1 for 2 anomalies / 40 dB, Table 3 for
2 anomalies / 25 dB), which is the same reconstruction.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from dgm_eit.files import atomic_path, write_text
from dgm_eit.metrics import LOWER_IS_BETTER, METRICS, Summary

# decimals per metric in tables: enough to separate methods at the paper's scale
DIGITS = {"MSE": 5, "PSNR": 2, "SSIM": 3, "RE": 3, "AE": 4, "DR": 3}

CSV_COLUMNS = ("test", "train_set", "test_set", "method", "metric", "mean", "std", "n")
PER_SAMPLE_COLUMNS = ("test", "train_set", "test_set", "method", "index", *METRICS)


def _row(*values: float) -> dict[str, tuple[float, float]]:
    return {m: (values[2 * i], values[2 * i + 1]) for i, m in enumerate(METRICS)}


# paper table number -> method -> metric -> (mean, std); Li et al., Tables 1-6
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

# the paper's model sizes (REFERENCE.md section 2), for the efficiency table
PAPER_PARAMETERS = {"CVAE": 0.94e6, "CNF": 4.8e6, "CSD*": 4.1e6}


def paper_mse_change(table: int, method: str) -> float | None:
    """The paper's relative MSE change of ``method`` against GN in ``table``, in percent."""
    rows = PAPER_RESULTS.get(table, {})
    if method not in rows:
        return None
    gn = PAPER_RESULTS[PAPER_GN_TABLE[table]]["GN"]["MSE"][0]
    return 100.0 * (rows[method]["MSE"][0] - gn) / gn


def format_metric(metric: str, summary: Summary) -> str:
    return summary.format(DIGITS[metric])


def format_percent(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:+.0f}%"


def best_methods(rows: Mapping[str, Mapping[str, Summary]]) -> dict[str, set[str]]:
    """Per metric, the method(s) with the best mean (DR: closest to 1), ties included."""
    best = {}
    for metric in METRICS:
        lower = LOWER_IS_BETTER[metric]
        scores = {}
        for method, summaries in rows.items():
            mean = summaries[metric].mean
            scores[method] = abs(mean - 1.0) if lower is None else (mean if lower else -mean)
        finite = {m: v for m, v in scores.items() if math.isfinite(v)}
        if finite:
            top = min(finite.values())
            best[metric] = {m for m, v in finite.items() if v == top}
    return best


def metrics_table(rows: Mapping[str, Mapping[str, Summary]],
                  extra: Mapping[str, Mapping[str, str]] | None = None, highlight: bool = False) -> str:
    """Markdown table ``Method | MSE | PSNR | SSIM | RE | AE | DR [| extra columns]``.

    ``highlight`` sets the best mean of each metric column in bold."""
    extra = extra or {}
    extra_columns = list(dict.fromkeys(col for cols in extra.values() for col in cols))
    header = ["Method", *METRICS, *extra_columns]
    best = best_methods(rows) if highlight and len(rows) > 1 else {}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for method, summaries in rows.items():
        cells = [method]
        for m in METRICS:
            text = format_metric(m, summaries[m])
            cells.append(f"**{text}**" if method in best.get(m, ()) else text)
        cells += [extra.get(method, {}).get(col, "-") for col in extra_columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_metrics_csv(path: str | Path, records: Iterable[Mapping], columns: tuple[str, ...] = CSV_COLUMNS) -> None:
    """CSV with ``columns`` (default: the long format of :data:`CSV_COLUMNS`, one row per metric)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for record in records:
            writer.writerow({k: record[k] for k in columns})


def comparison_figure(path: str | Path, truth: np.ndarray, recons: Mapping[str, np.ndarray],
                      stds: Mapping[str, np.ndarray], title: str) -> None:
    """Rows = samples; columns = ground truth, each method, then std maps.

    All conductivity panels share one colour scale (the ground truth's range over the
    shown samples, so over- and undershoot saturate visibly); the std maps share another.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("ground truth", truth, "value")] + [(n, a, "value") for n, a in recons.items()]
    panels += [(f"{n} std", a, "std") for n, a in stds.items()]
    n_rows, n_cols = truth.shape[0], len(panels)
    vmin, vmax = float(truth.min()), float(truth.max())
    std_max = max([float(a.max()) for a in stds.values()] + [1e-12])
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.6 * n_cols + 0.9, 1.6 * n_rows + 0.5), squeeze=False)
    value_image = std_image = None
    for col, (name, images, kind) in enumerate(panels):
        for row in range(n_rows):
            ax = axes[row, col]
            if kind == "value":
                value_image = ax.imshow(images[row], vmin=vmin, vmax=vmax, cmap="viridis")
            else:
                std_image = ax.imshow(images[row], vmin=0.0, vmax=std_max, cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    if value_image is not None:
        fig.colorbar(value_image, cax=fig.add_axes((0.91, 0.52, 0.015, 0.36)), label="σ")
    if std_image is not None:
        fig.colorbar(std_image, cax=fig.add_axes((0.91, 0.1, 0.015, 0.36)), label="std")
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=80)
    finally:
        plt.close(fig)


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.1f} ms"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"


def _count(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e3:
        return f"{value / 1e3:.1f} k"
    return f"{value:.0f}"


SAMPLER_TEXT = {
    "csd": "sampler `csd` (the paper's CSD*: the GN image replaces the state at t0, then the plain reverse process)",
    "dds": "sampler `dds` (CSD* with data consistency: the GN image at t0, then at every reverse step the "
           "denoised image takes a proximal Gauss-Newton step on the measured voltages before it is re-noised)",
}


def setting_section(sr, cfg: dict) -> str:
    """One results table of a run (a ``SettingResult`` of :mod:`dgm_eit.experiments`)."""
    s = sr.setting
    lines = [f"### {s.title} (paper Table {s.paper_table})", ""]
    gn = sr.get("gn")
    rows, extra = {}, {}
    for mr in sr.methods:
        label = mr.name if mr.train_set is None or mr.train_set == s.data else f"{mr.name} ({mr.train_set.label})"
        rows[label] = mr.summaries
        ours = None
        if gn is not None and mr.method != "gn":
            ours = 100.0 * (mr.summaries["MSE"].mean - gn.summaries["MSE"].mean) / gn.summaries["MSE"].mean
        paper = paper_mse_change(s.paper_table, mr.name) if mr.method != "gn" else None
        extra[label] = {"MSE vs GN": format_percent(ours), "paper MSE vs GN": format_percent(paper)}
    if rows:
        n = next(iter(sr.methods)).summaries["MSE"].n
        lines.append(metrics_table(rows, extra, highlight=True))
        lines.append("")
        lines.append(f"Mean ± std over {n} test images. Paper (Table {s.paper_table}, mean): "
                     + ", ".join(f"{m} MSE {v['MSE'][0]:.4f} / SSIM {v['SSIM'][0]:.3f}"
                                 for m, v in PAPER_RESULTS[s.paper_table].items()) + ".")
    if sr.gn_settings:
        from dgm_eit.recon.tuning import describe

        lines += ["", f"GN: {describe(sr.gn_settings)}; the models that read a GN image read these."]
    for mr in sr.methods:
        if mr.sampling:
            how = SAMPLER_TEXT.get(mr.sampling.get("sampler"), mr.sampling.get("sampler", "csd"))
            lines += ["", f"{mr.name}: {how}; t0 = {mr.sampling['t0']:g}, {mr.sampling['n_steps']} reverse steps, "
                          f"chosen on the validation split of {mr.sampling['tuned_on']}."]
    for method, why in sr.missing.items():
        lines.append(f"\n*{method}: missing — {why}*")
    if sr.figure is not None:
        rel = os.path.relpath(sr.figure, sr.figure.parent.parent)
        lines += ["", f"![{s.title}]({rel})"]
    return "\n".join(lines)


def efficiency_section(result) -> str:
    from dgm_eit.experiments import METHOD_NAMES

    rows = []
    for row in result.efficiency:
        name = METHOD_NAMES[row.method]
        paper = PAPER_PARAMETERS.get(name if row.method != "guided" else "CSD*")
        rows.append([name, row.train_set.label if row.train_set else "-", _count(row.parameters),
                     _count(paper) if paper else "-", _seconds(row.train_seconds), _count(row.train_steps),
                     _seconds(row.seconds_per_image), _count(row.nfe), row.device])
    text = markdown_table(["Method", "trained on", "parameters", "paper parameters", "training wall time",
                           "optimiser steps", "reconstruction time / image", "NFE / image", "device"], rows)
    return text + ("\n\nCSD* and CSD-guided share the score prior (its parameters and training time). "
                   "GN has no training; its time is one Gauss-Newton solve, timed in the main process. "
                   "Reconstruction times include every sample drawn (see `[run]` *_samples), not the "
                   "validation sweep that chose CSD*'s t0 (`[run]` csd_tune_*).")


def beats_gn_section(result) -> str:
    lines = []
    for sr in result.settings:
        gn = sr.get("gn")
        if gn is None:
            continue
        verdicts = []
        for mr in sr.methods:
            if mr.method == "gn":
                continue
            better = mr.summaries["MSE"].mean < gn.summaries["MSE"].mean
            verdicts.append(f"{mr.name} {'yes' if better else '**no**'}")
        lines.append(f"- {sr.setting.title}: " + ", ".join(verdicts))
    return "\n".join(lines)


def stages_section(result) -> str:
    rows = []
    for name, record in result.stages.items():
        status = record.get("status", "?")
        detail = record.get("message", "")
        if status == "done":
            if "seconds" in record:
                detail = _seconds(record["seconds"]) + (" (earlier run)" if record.get("reused") else "")
            elif "seconds_per_image" in record:
                detail = f"{_seconds(record['seconds_per_image'])} per image"
            else:
                detail = "reused"
        rows.append([name, status, detail.replace("|", "/").replace("\n", " ")])
    return markdown_table(["stage", "status", "time / note"], rows)


def expected_time(cfg: dict) -> str:
    return str(cfg["run"]["expected_time"])


def render_report(result) -> str:
    """The text of ``report.md`` for a ``RunResult`` of :mod:`dgm_eit.experiments`."""
    cfg = result.cfg
    data = cfg["data"]
    # stages reused from earlier (interrupted) calls keep the time they took then
    total = sum(r.get("seconds", 0.0) for r in result.stages.values() if r.get("status") == "done")
    lines = [
        f"# dgm-eit report: profile `{cfg.get('profile', '?')}`, seed {result.seed}",
        "",
        f"Images {data['image_size']} x {data['image_size']}; {data['n_train']} / {data['n_val']} / "
        f"{data['n_test']} train / validation / test samples per data set; inversion mesh h0 = "
        f"{cfg['mesh']['h0']}, simulation mesh h0 = {cfg['simulation']['h0']} "
        f"({cfg['mesh']['electrode_model']} electrodes). This call took {_seconds(result.wall_seconds)}; "
        f"the stages' own times add up to {_seconds(total)} (stages run side by side overlap; stages "
        f"reused from an earlier call count with the time they took then). Expected time of this profile: "
        f"{expected_time(cfg)}.",
        "",
        "Metrics, one implementation for every method (`dgm_eit.metrics`; README section \"Reconstruction "
        "and scores\"), on the full 0-outside-the-disk image: MSE, "
        "PSNR and SSIM with the ground truth's range R = max - min, RE = ‖x̂ - x‖₁/‖x‖₁, AE = mean |x̂ - x|, "
        "DR = (max x̂ - min x̂)/R (best at 1). SSIM: 7 x 7 uniform window, K1 0.01, K2 0.03. "
        "Bold: the best mean of each column. \"MSE vs GN\" is the relative change of the mean MSE against Gauss-Newton on the same test set, "
        "ours beside the paper's. Figures share one colour scale per figure (the ground truth's range).",
    ]
    for test, heading in (("T1", "Test 1: low noise"), ("T2", "Test 2: high noise"),
                          ("T3", "Test 3: generalisation (trained on 4 anomalies)")):
        sections = [sr for sr in result.settings if sr.setting.test == test]
        if not sections:
            continue
        lines += ["", f"## {heading}"]
        for sr in sections:
            lines += ["", setting_section(sr, cfg)]
    lines += ["", "## Does every generative model beat GN on MSE?", "", beats_gn_section(result) or "(no GN)"]
    lines += ["", "## Efficiency", "", efficiency_section(result)]
    lines += ["", "## Stages", "", stages_section(result)]
    failures = result.failures
    if failures:
        lines += ["", f"**{len(failures)} stage(s) did not complete**; re-run the same command to retry them."]
    return "\n".join(lines) + "\n"


def write_outputs(result) -> dict[str, Path]:
    """Write ``report.md``, ``metrics.csv`` and ``metrics_per_sample.csv``; figures are already in place."""
    out = Path(result.out)
    paths = {"report": out / "report.md", "metrics": out / "metrics.csv",
             "per_sample": out / "metrics_per_sample.csv"}
    write_metrics_csv(paths["metrics"], result.records())
    write_metrics_csv(paths["per_sample"], result.per_sample_records(), PER_SAMPLE_COLUMNS)
    write_text(paths["report"], render_report(result))
    return paths
