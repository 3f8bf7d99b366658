"""``dgm-eit bench simulate``: paper-profile simulation throughput, extrapolated to 23,810 samples.

Runs the real pipeline (phantom, fine-mesh voltages, noise, Gauss-Newton on the h0 = 0.05
inversion mesh, 128 x 128 rasterisation) on ``--samples`` training samples in the same
worker pool as ``dgm-eit simulate``, without writing a file (the write costs little next to
Gauss-Newton). The steady rate is measured between the first and the last finished chunk,
so worker start-up (imports, meshes) is counted once, as a fixed cost, in the estimate.
Worker CPU time is reported too: on a shared machine the wall-clock rate measures the
other users as much as the simulator, and ``paper_scale_minutes_idle`` is the estimate from
CPU time alone (the workers' own cost with the cores to themselves).
"""

from __future__ import annotations

import json
import time

# The paper's "23,810 pairs per set" (the extrapolation target). Its split sizes,
# 21,600 / 2,160 / 2,050 (the paper profile), add up to 25,810; both figures are reported.
PAPER_SAMPLES = 23810


def measure(cfg: dict, *, samples: int, workers: int, seed: int = 0, chunk_size: int = 8) -> dict:
    from dgm_eit.data.simulate import Task, check_config, run_tasks

    check_config(cfg, seed)
    cfg_json = json.dumps(cfg, sort_keys=True)
    tasks = [Task("train", k, start, min(start + chunk_size, samples))
             for k, start in enumerate(range(0, samples, chunk_size))]
    started = time.perf_counter()
    finished = []  # (time, samples) of each chunk
    cpu_seconds = 0.0
    for task, (arrays, cpu) in run_tasks(cfg_json, seed, tasks, workers=workers, timed=True):
        finished.append((time.perf_counter() - started, task.size))
        cpu_seconds += cpu
    wall = time.perf_counter() - started
    cpu_per_sample = cpu_seconds / samples
    first_t = finished[0][0]
    # chunks finishing after the first one, over the time they took: the steady rate
    later = sum(n for _, n in finished[1:])
    span = finished[-1][0] - first_t
    if later and span > 0:
        rate = later / span
    else:
        rate = samples / wall
    startup = max(0.0, wall - samples / rate)
    paper_minutes = (startup + PAPER_SAMPLES / rate) / 60.0
    profile_samples = sum(int(cfg["data"][k]) for k in ("n_train", "n_val", "n_test"))
    return {"cpu_s_per_sample": cpu_per_sample,
            # what the same workers would take on an otherwise idle machine (CPU time only)
            "paper_scale_minutes_idle": PAPER_SAMPLES * cpu_per_sample / workers / 60.0,
            "profile_samples": profile_samples,
            "profile_minutes": (startup + profile_samples / rate) / 60.0,"samples": samples, "workers": workers, "wall_s": wall, "startup_s": startup,
            "samples_per_s": rate, "seconds_per_sample_per_worker": workers / rate,
            "paper_samples": PAPER_SAMPLES, "paper_scale_minutes": paper_minutes,
            "image_size": int(cfg["data"]["image_size"]), "mesh_h0": float(cfg["mesh"]["h0"]),
            "simulation_h0": float(cfg["simulation"]["h0"])}


def run(args) -> int:
    """Entry point of ``dgm-eit bench simulate`` (``--json``, ``--workers``, ``--samples``, ``--seed``)."""
    from dgm_eit.config import load_config
    from dgm_eit.errors import InputError
    from dgm_eit.runtime import cpu_count

    profile = getattr(args, "profile", None) or "paper"
    overrides = getattr(args, "overrides", None) or []
    samples = getattr(args, "samples", None) or 200
    workers = getattr(args, "workers", None) or cpu_count()
    seed = getattr(args, "seed", 0) or 0
    if samples < 2:
        raise InputError(f"--samples must be >= 2, got {samples}")
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    cfg = load_config(profile, overrides)
    chunk = max(1, min(8, samples // (4 * workers)))
    result = measure(cfg, samples=samples, workers=workers, seed=seed, chunk_size=chunk)
    result["profile"] = profile
    print(f"simulate ({profile} profile: {result['image_size']}x{result['image_size']} images, inversion mesh "
          f"h0 {result['mesh_h0']}, simulation mesh h0 {result['simulation_h0']}, Gauss-Newton included)")
    print(f"  {samples} samples on {workers} worker(s): {result['wall_s']:.1f} s wall, start-up "
          f"{result['startup_s']:.1f} s, {result['samples_per_s']:.2f} samples/s "
          f"({1000 * result['seconds_per_sample_per_worker']:.0f} ms per sample per worker)")
    print(f"  CPU time {1000 * result['cpu_s_per_sample']:.0f} ms per sample: "
          f"{result['paper_scale_minutes_idle']:.1f} minutes for {PAPER_SAMPLES} samples on {workers} idle core(s)")
    print(f"  paper scale ({PAPER_SAMPLES} samples): {result['paper_scale_minutes']:.1f} minutes; "
          f"this profile's splits ({result['profile_samples']} samples): {result['profile_minutes']:.1f} minutes")
    if getattr(args, "json", False):
        print(json.dumps(result))
    return 0
