"""``dgm-eit inspect FILE``: what a data set holds (config, sizes, measured SNR, value ranges)."""

from __future__ import annotations

import argparse

HELP = ("summarise a data-set file: config, split sizes, measured SNR, value ranges "
        "(exit 1 when it holds NaN or infinite values)")

_BLOCK = 1024  # samples read at a time, so paper-size files need little memory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="data-set HDF5 file written by dgm-eit simulate")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def summarise(path) -> dict:
    """Per-split statistics of a data set, read block by block."""
    import json

    import numpy as np

    from dgm_eit.data import storage
    from dgm_eit.data.noise import measured_snr_db

    with storage.open_dataset(path) as f:
        cfg = json.loads(f.attrs["config"])
        out = {"file": str(path), "format_version": int(f.attrs["format_version"]),
               "dgm_eit_version": str(f.attrs["dgm_eit_version"]),
               "seed": int(f.attrs["seed"]) if "seed" in f.attrs else None, "config": cfg, "splits": {}}
        for split in storage.SPLITS:
            g = f[split]
            n = int(g["v"].shape[0])
            stats = {"samples": n, "image_size": list(g["sigma"].shape[1:]), "n_meas": int(g["v"].shape[1])}
            if n:
                snr, mse = [], []
                ranges = {k: [np.inf, -np.inf] for k in storage.ARRAY_KEYS}
                nonfinite = {k: [0, None] for k in storage.ARRAY_KEYS}   # count, first sample
                values = set()
                for start in range(0, n, _BLOCK):
                    stop = min(start + _BLOCK, n)
                    block = {k: g[k][start:stop].astype(np.float64) for k in storage.ARRAY_KEYS}
                    snr.append(measured_snr_db(block["v_clean"], block["v"]))
                    mse.append(((block["gn"] - block["sigma"]) ** 2).mean(axis=(1, 2)))
                    for k, a in block.items():
                        finite = np.isfinite(a)
                        if not finite.all():
                            bad = ~finite.reshape(len(a), -1).all(axis=1)
                            if nonfinite[k][1] is None:
                                nonfinite[k][1] = start + int(np.flatnonzero(bad)[0])
                            nonfinite[k][0] += int((~finite).sum())
                            a = a[finite]   # the ranges are those of the finite values
                        if a.size:
                            ranges[k] = [min(ranges[k][0], float(a.min())), max(ranges[k][1], float(a.max()))]
                    if len(values) <= 64:
                        values.update(np.unique(block["sigma"]).tolist())
                snr = np.concatenate(snr)
                mse = np.concatenate(mse)
                finite = snr[np.isfinite(snr)]
                stats.update({
                    "snr_db_mean": float(finite.mean()) if finite.size else float("inf"),
                    "snr_db_std": float(finite.std()) if finite.size else 0.0,
                    "gn_mse_mean": float(mse.mean()), "gn_mse_std": float(mse.std()),
                    "ranges": ranges,
                    "nonfinite": {k: {"count": c, "first_sample": i} for k, (c, i) in nonfinite.items() if c},
                    "sigma_values": sorted(values) if len(values) <= 64 else None,
                })
            out["splits"][split] = stats
    return out


def _describe(cfg: dict) -> list[str]:
    d, p, m, s, g = (cfg.get(k, {}) for k in ("data", "phantom", "mesh", "simulation", "gn"))
    if "tank" in cfg:
        t = cfg["tank"]
        return [f"profile {cfg.get('profile', '?')}: KTC2023 tank, {p.get('count_min')}-{p.get('count_max')} objects "
                f"({', '.join(p.get('shapes', []))}), levels {t.get('train_levels')}, images "
                f"{d.get('image_size')}x{d.get('image_size')} of sigma / sigma_water in [0, 2]",
                f"meshes h0 {t.get('sim_h0')} m (simulation) and {t.get('h0')} m (reconstruction); noise "
                f"{t.get('noise_scale')} x the organisers' model; data term "
                + (f"std {t['data_std']} V on every measurement" if t.get("data_std") else "weighted by the noise model")
                + "; 'gn' = the linearised difference image"]
    lines = [f"profile {cfg.get('profile', '?')}: {d.get('anomalies')} anomalies ({p.get('kind', 'circles')}), "
             f"SNR {d.get('snr_db')} dB, images {d.get('image_size')}x{d.get('image_size')}"]
    if p:
        cond = p.get("conductivities") or "paper's"
        lines.append(f"phantom: background {p.get('background')}, conductivities {cond}, radius "
                     f"{p.get('radius_min')}-{p.get('radius_max')}, centres within {p.get('centre_max')}, "
                     f"gap {p.get('gap')}")
    if m and s:
        lines.append(f"simulation mesh h0 {s.get('h0')} ({s.get('electrode_model')} electrodes); inversion mesh "
                     f"h0 {m.get('h0')} ({m.get('electrode_model')}); {m.get('n_electrodes')} electrodes, "
                     f"{m.get('protocol')} protocol")
    if g:
        lines.append(f"Gauss-Newton: {g.get('method')}, lam {g.get('lam')}, max_iter {g.get('max_iter')}")
    return lines


def run(args: argparse.Namespace) -> int:
    import json

    info = summarise(args.file)
    if args.json:
        print(json.dumps(info))
        return _flag_nonfinite(info)
    print(f"{info['file']}: dgm-eit data set, format {info['format_version']}, written by dgm-eit "
          f"{info['dgm_eit_version']}, seed {info['seed']}")
    for line in _describe(info["config"]):
        print("  " + line)
    header = f"{'split':6} {'samples':>7} {'image':>7} {'M':>4} {'SNR dB':>13} {'sigma range':>17} " \
             f"{'GN range':>17} {'|v| max':>8} {'GN MSE':>16}"
    print(header)
    for split, st in info["splits"].items():
        size = "x".join(map(str, st["image_size"]))
        if not st["samples"]:
            print(f"{split:6} {0:>7} {size:>7} {st['n_meas']:>4}")
            continue
        r = st["ranges"]
        vmax = max(abs(r["v"][0]), abs(r["v"][1]))
        print(f"{split:6} {st['samples']:>7} {size:>7} {st['n_meas']:>4} "
              f"{st['snr_db_mean']:6.2f}+-{st['snr_db_std']:<5.2f} "
              f"[{r['sigma'][0]:6.3g}, {r['sigma'][1]:6.3g}] [{r['gn'][0]:6.3g}, {r['gn'][1]:6.3g}] "
              f"{vmax:8.3g} {st['gn_mse_mean']:.4f}+-{st['gn_mse_std']:.4f}")
    values = info["splits"]["train"].get("sigma_values")
    if values is not None:
        print("ground-truth values (train): " + ", ".join(f"{v:g}" for v in values))
    return _flag_nonfinite(info)


def _flag_nonfinite(info: dict) -> int:
    """NaN/inf values make a data set unusable (training, scoring): say where, exit 1."""
    import sys

    problems = [f"{split}/{key}: {bad['count']} value(s) (first in sample {bad['first_sample']})"
                for split, st in info["splits"].items() for key, bad in st.get("nonfinite", {}).items()]
    if not problems:
        return 0
    print(f"dgm-eit inspect: warning: {info['file']} holds NaN or infinite values, so it cannot be used for "
          f"training or scoring: {'; '.join(problems)}", file=sys.stderr)
    return 1
