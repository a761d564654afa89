"""Statistics, merging and reports of the reproduction (:mod:`refimpl.reproduce`): Tables 1-2 with error bars.

Every cell is the mean over seeds ± its standard error ``sd / sqrt(n)`` (:func:`mean_se`); a claim of the paper
(paper §5) is judged on its per-seed paired difference ``h_s`` (same seed = same planted task and same training
stream for every row) by the two-sided Student-t interval at 95% (:func:`verdict`): "holds" if the interval lies
above 0, "does not hold" if below, otherwise "cannot tell at n seeds".

Contents: :func:`mean_se`, :func:`verdict`, :func:`summarize`, :func:`claims`, :func:`load_parts`,
:func:`merge_parts`, :func:`markdown_report`, :func:`figure`, :func:`write_json`, :func:`write_result`.
"""
from __future__ import annotations

import datetime
import glob
import json
import math
import os

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from scipy import stats

from refimpl.reproduce import ABLATION, METRICS, ROWS, SCHEMA, TABLE1, TABLE2

__all__ = ["mean_se", "verdict", "summarize", "claims", "load_parts", "merge_parts", "markdown_report", "figure",
           "write_json", "write_result", "jsonable"]


# ------------------------------------------------------------------------------------------------ statistics
def mean_se(values) -> tuple[float, float]:
    """``(mean, sd / sqrt(n))`` of the finite values (sd with n - 1 degrees of freedom); se NaN for n < 2."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), float("nan")
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size))


def verdict(diffs, *, level: float = 0.95) -> dict:
    """Judge "E[h] > 0" from per-seed paired values ``h_s`` by the two-sided Student-t interval at ``level``.

    ``mean ± t_{n-1, (1+level)/2} se``: entirely above 0 -> "holds", entirely below -> "does not hold", else (or
    n < 2) -> "cannot tell at n seeds". Returns verdict, mean, se, n, lo, hi.
    """
    mean, se = mean_se(diffs)
    n = sum(1 for x in diffs if x is not None and np.isfinite(x))
    if n < 2 or not np.isfinite(se):
        lo = hi = float("nan")
        word = f"cannot tell at {n} seed{'s' if n != 1 else ''}"
    else:
        half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
        lo, hi = mean - half, mean + half
        word = "holds" if lo > 0 else "does not hold" if hi < 0 else f"cannot tell at {n} seeds"
    return {"verdict": word, "mean": mean, "se": se, "n": n, "lo": lo, "hi": hi}


def _finals(runs, task):
    """``{row: {seed: final (+ dynnibal timings)}}`` of one task."""
    out: dict = {}
    for r in runs:
        if r["task"] == task:
            out.setdefault(r["row"], {})[r["seed"]] = {**r["final"], **{f"dyn_{k}": v for k, v in
                                                                       r.get("dynnibal", {}).items()}}
    return out


def summarize(runs, task) -> dict:
    """Per row of ``task``: the seeds, and (mean, se) of every metric, Mem %, encoder calls, times, and
    ``gap_to_bf`` = 100 (R@1 of brute force - R@1 of the row), paired by seed (seeds without brute force skipped)."""
    fin = _finals(runs, task)
    bf = fin.get("brute-force", {})
    out = {}
    for row in [r for r in ROWS if r in fin]:
        by_seed = fin[row]
        s = {"seeds": sorted(by_seed), "label": ROWS[row].label}
        for key in METRICS + ("mem_percent", "encoder_calls", "wall_time", "time_per_step", "train_cpu",
                              "cpu_per_mining_step"):
            vals = [f.get(key) for f in by_seed.values()]
            if any(v is not None for v in vals):
                s[key] = mean_se(vals)
        if bf:
            s["gap_to_bf"] = mean_se([100 * (bf[k]["R@1"] - f["R@1"]) for k, f in by_seed.items() if k in bf])
        out[row] = s
    return out


def _paired(fin, rows, fn):
    seeds = sorted(set.intersection(*[set(fin.get(r, {})) for r in rows])) if rows else []
    return [fn(*[fin[r][s] for r in rows]) for s in seeds]


def claims(runs, task) -> list[dict]:
    """The paper's claims (paper §5) on ``task``, each with its per-seed paired values and :func:`verdict`.

    - "R@1 gap to brute force halved vs X" (X = in-batch, uniform, SNM 1/3/10%): ``h = gap_X / 2 - gap_DyNNIBAL``
      (points), gap = R@1(brute force) - R@1(row).
    - memory vs Negative Cache: ``h = MRR@10(DyNNIBAL) - MRR@10(Negative Cache 15.15%)`` (the paper: DyNNIBAL at
      0.76% memory matches it at ~20x less memory); the memory ratio is reported beside it.
    - steps at most 4x slower than SNM 3%: ``h = 4 t(SNM 3%) - t(DyNNIBAL)``, t = CPU seconds per mining step
      (periodic work amortised; CPU, not wall time, because the machine may be shared).
    - re-encoding >= 8x faster than the encoder: ``h = t(encode all N) / t(Alg. 5) - 8``.
    - tree update >= 4x faster than a rebuild: ``h = t(build) / t(Alg. 3 update) - 4``.
    Claims whose rows are missing are left out.
    """
    fin = _finals(runs, task)
    gap = lambda b, x: 100 * (b["R@1"] - x["R@1"])
    out = []

    def add(cid, text, rows, fn, **extra):
        if all(r in fin for r in rows):
            h = _paired(fin, rows, fn)
            if h:
                out.append({"id": cid, "claim": text, "rows": list(rows), "values": h, **verdict(h), **extra})

    for x in ("in-batch", "uniform", "snm-1", "snm-3", "snm-10"):
        add(f"gap-halved-vs-{x}", f"DyNNIBAL's R@1 gap to brute force is at most half of {ROWS[x].label}'s",
            ("brute-force", "dynnibal", x), lambda b, d, o: gap(b, o) / 2 - gap(b, d))
    if "dynnibal" in fin and "nc-15.15" in fin:
        ratio = mean_se([fin["nc-15.15"][s]["mem_percent"] / fin["dynnibal"][s]["mem_percent"]
                         for s in fin["dynnibal"] if s in fin["nc-15.15"]])[0]
        add("memory-vs-nc", "DyNNIBAL's MRR@10 is at least Negative Cache 15.15%'s", ("dynnibal", "nc-15.15"),
            lambda d, c: d["MRR@10"] - c["MRR@10"], memory_ratio=ratio)
    add("steps-4x-snm", "a DyNNIBAL training step costs at most 4x an SNM 3% step", ("dynnibal", "snm-3"),
        lambda d, s: 4 * s["cpu_per_mining_step"] - d["cpu_per_mining_step"])
    if "dynnibal" in fin and all(f.get("dyn_reencode_seconds") for f in fin["dynnibal"].values()):
        add("reencode-8x", "an Alg. 5 re-encode is at least 8x faster than encoding every target", ("dynnibal",),
            lambda d: d["dyn_full_encode_seconds"] / d["dyn_reencode_seconds"] - 8)
    if "dynnibal" in fin and all(f.get("dyn_tree_update_seconds") for f in fin["dynnibal"].values()):
        add("tree-update-4x", "an Alg. 3 tree update is at least 4x faster than rebuilding the tree", ("dynnibal",),
            lambda d: d["dyn_tree_build_seconds"] / d["dyn_tree_update_seconds"] - 4)
    return out


# ------------------------------------------------------------------------------------------------ parts I/O
def jsonable(o):
    """``o`` with NumPy scalars and arrays as Python numbers and lists, non-finite floats as None (strict JSON)."""
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return jsonable(o.tolist())
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (float, np.floating)):
        return float(o) if np.isfinite(o) else None
    if o is None or isinstance(o, (bool, int, str)):
        return o
    return str(o)


def load_parts(paths) -> list[dict]:
    """Read part files (or every ``*.json`` of a directory); ValueError naming a file that is not a part."""
    files = []
    for p in paths:
        files += sorted(glob.glob(os.path.join(p, "*.json"))) if os.path.isdir(p) else [p]
    parts = []
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                d = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{f}: not readable as JSON ({exc})") from None
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            continue  # merged results and other JSON files beside the parts
        if "parts" in d:
            continue
        d["_file"] = f
        parts.append(d)
    if not parts:
        raise ValueError(f"merge: no part file (schema {SCHEMA}) in {', '.join(map(str, paths))}")
    return parts


def merge_parts(parts) -> dict:
    """One result from several parts: runs concatenated; the same (task, row, seed) twice, or one task under two
    different configurations (scale or task description), is a ValueError naming both files."""
    merged = {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "parts": [], "tasks": {}, "runs": [], "scales": {}}
    seen: dict = {}
    for p in parts:
        name = p.get("_file", "<part>")
        merged["parts"].append({k: p.get(k) for k in ("_file", "created", "command", "commit", "machine",
                                                      "wall_seconds", "complete")})
        for key, info in p["tasks"].items():
            cfg = jsonable((info, p["scale"]))
            if key in merged["tasks"] and jsonable(merged["scales"][key][:2]) != cfg:
                raise ValueError(f"merge: task {key!r} has a different configuration in {name} than in "
                                 f"{merged['scales'][key][2]}")
            merged["tasks"].setdefault(key, info)
            merged["scales"].setdefault(key, (info, p["scale"], name))
        for r in p["runs"]:
            k = (r["task"], r["row"], r["seed"])
            if k in seen:
                raise ValueError(f"merge: {k[0]} / {k[1]} / seed {k[2]} is in both {seen[k]} and {name}")
            seen[k] = name
            merged["runs"].append(r)
    merged["scales"] = {k: v[1] for k, v in merged["scales"].items()}
    return merged


# ------------------------------------------------------------------------------------------------ reports
def _cells(summary, rows):
    return [(summary[r]["label"] + (f" (d' {int(summary[r]['dyn'])})" if "dyn" in summary[r] else ""),
             summary[r]) for r in rows if r in summary]


def _cost_table(cells) -> str:
    """Mem %, target-encoder calls, training CPU, CPU per mining step and training wall time of every row."""
    def cell(s, key, scale, fmt):
        m, se = s.get(key, (float("nan"), float("nan")))
        if not np.isfinite(m):
            return "-"
        shown = np.isfinite(se) and se > 1e-9 * max(1.0, abs(m))  # one seed, or the same value for all: no ± part
        return fmt.format(scale * m) + (" ± " + fmt.format(scale * se) if shown else "")

    lines = ["| method | Mem % | target-encoder calls | train CPU (s) | CPU per mining step (ms) | train wall (s) |",
             "|---|---|---|---|---|---|"]
    for label, s in cells:
        lines.append(f"| {label} | {cell(s, 'mem_percent', 1, '{:.3g}')} | {cell(s, 'encoder_calls', 1, '{:,.0f}')} | "
                     f"{cell(s, 'train_cpu', 1, '{:.1f}')} | {cell(s, 'cpu_per_mining_step', 1e3, '{:.1f}')} | "
                     f"{cell(s, 'wall_time', 1, '{:.1f}')} |")
    return "\n".join(lines)


def markdown_report(result: dict, table) -> str:
    """Tables 1 and 2, the landmark ablation, the timing columns and the claims' verdicts of every task of
    ``result`` (a part or a merge), formatted with ``table`` (the project's table formatter,
    :func:`refimpl.experiments.table_markdown`, which renders (mean, se) cells as "mean ± se")."""
    out = []
    parts = result.get("parts") or [result]
    commits = sorted({(p.get("commit") or {}).get("sha", "unknown") + ("+dirty" if (p.get("commit") or {}).get(
        "dirty") else "") for p in parts})
    out.append(f"Commits: {', '.join(commits)}. Machines: " + "; ".join(sorted({
        f"{p['machine']['platform']}, {p['machine']['cpu_count']} CPUs, "
        f"{(p['machine']['memory_bytes'] or 0) / 2 ** 30:.0f} GiB" for p in parts})) + ".")
    partial = [str(p.get("_file") or p.get("command")) for p in parts if p.get("complete") is False]
    if partial:
        out.append(f"Incomplete parts (stopped before their last run; their finished runs are included): "
                   f"{', '.join(partial)}.")
    out.append("Cells: mean ± standard error over seeds. R@1 gap to BF: brute force's R@1 minus the row's, in "
               "points, paired by seed. Rows marked (ours) are not the paper's runs. Verdicts: 95% Student-t "
               "interval of the per-seed paired difference.")
    for key, info in result["tasks"].items():
        summ = summarize(result["runs"], key)
        for r, s in summ.items():
            d = [x["dynnibal"]["n_landmarks"] for x in result["runs"] if x["task"] == key and x["row"] == r
                 and "dynnibal" in x]
            if d:
                s["dyn"] = d[0]
        seeds = sorted({x["seed"] for x in result["runs"] if x["task"] == key})
        out.append(f"\n## {key}: N = {info['n_targets']:,} targets, {info['n_train']:,} train / {info['n_test']:,} "
                   f"test queries; seeds {', '.join(map(str, seeds))}")
        out.append("\n### Table 1 (R@k)\n")
        out.append(table(_cells(summ, TABLE1), probes=False))
        if info.get("tfidf"):
            tf = info["tfidf"]
            out.append("\nTF-IDF cosine, no training: " + ", ".join(f"{k} {tf[k]:.3f}" for k in ("R@1", "R@10",
                                                                                                  "R@100")))
        out.append("\n### Table 2 (MRR@k; Negative Cache at the paper's memories)\n")
        out.append(table(_cells(summ, TABLE2), ks=(), gap=False, probes=False, mrr=(1, 10, 100)))
        out.append("\n### Landmark ablation (DyNNIBAL, sampler 'paper')\n")
        out.append(table(_cells(summ, ABLATION), ks=(1, 100), gap=True, probes=False))
        out.append("\n### Cost (CPU seconds of this process; wall time also counts other load on the machine)\n")
        out.append(_cost_table(_cells(summ, [r for r in ROWS if r in summ])))
        cl = claims(result["runs"], key)
        if cl:
            out.append("\n### The paper's claims on this task\n")
            for c in cl:
                extra = f"; memory ratio {c['memory_ratio']:.1f}x" if "memory_ratio" in c else ""
                out.append(f"- {c['claim']}: **{c['verdict']}** (h = {c['mean']:+.3g} ± {c['se']:.2g}, 95% "
                           f"interval [{c['lo']:+.3g}, {c['hi']:+.3g}], n = {c['n']}{extra})")
        notes = sorted({n for x in result["runs"] if x["task"] == key for n in x.get("notes", [])})
        if notes:
            out.append("\nDeviations from the recipe:\n" + "\n".join(f"- {n}" for n in notes))
    return "\n".join(out) + "\n"


def figure(result: dict, path: str) -> str:
    """Test R@1 over training per row (mean over seeds, band ± one standard error): per task, one panel with the
    Table 1 rows and one with the Negative Cache memories and the landmark ablation (PNG)."""
    keys = list(result["tasks"])
    groups = [("Table 1 rows", TABLE1), ("Negative Cache memories, landmark ablation",
                                         tuple(r for r in ROWS if r.startswith("nc-")) + ABLATION)]
    fig = Figure(figsize=(13, 4.5 * len(keys)))
    axes = fig.subplots(len(keys), 2, squeeze=False)
    colours = colormaps["tab20"].colors
    for (a1, a2), key in zip(axes, keys):
        for ax, (title, rows) in zip((a1, a2), groups):
            for i, row in enumerate(rows):
                runs = [r for r in result["runs"] if r["task"] == key and r["row"] == row]
                if not runs:
                    continue
                steps = sorted(set.intersection(*[{e["step"] for e in r["evals"]} for r in runs]))
                ms = np.array([mean_se([next(e["R@1"] for e in r["evals"] if e["step"] == s) for r in runs])
                               for s in steps])
                c = colours[i % len(colours)]
                ax.plot(steps, ms[:, 0], marker="o", ms=3, color=c, label=ROWS[row].label,
                        ls="-" if ROWS[row].paper else "--")
                se = np.nan_to_num(ms[:, 1])
                ax.fill_between(steps, ms[:, 0] - se, ms[:, 0] + se, color=c, alpha=0.18, lw=0)
            ax.set_xlabel("training step")
            ax.set_ylabel("test R@1 (exact re-encoding)")
            ax.set_title(f"{key}: {title} (band: ± 1 s.e. over seeds)", fontsize=9)
            if ax.lines:
                ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_json(result: dict, out_dir: str, stem: str) -> str:
    """Write ``stem.json`` in ``out_dir`` (strict JSON; a merge gets its summary and claims), atomically: a part
    checkpointed after every run is never left half-written. Returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, stem + ".json")
    body = {k: v for k, v in result.items() if k != "_file"}
    if "parts" in result:
        body["summary"] = {k: summarize(result["runs"], k) for k in result["tasks"]}
        body["claims"] = {k: claims(result["runs"], k) for k in result["tasks"]}
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(jsonable(body), fh, indent=1)
    os.replace(path + ".tmp", path)
    return path


def write_result(result: dict, out_dir: str, stem: str, table, *, with_figure: bool = True) -> list[str]:
    """Write ``stem.json`` (:func:`write_json`), ``stem.md`` (and ``stem.png``) in ``out_dir``; returns the paths."""
    paths = [write_json(result, out_dir, stem), os.path.join(out_dir, stem + ".md")]
    with open(paths[1], "w", encoding="utf-8") as fh:
        fh.write(f"# Tables 1-2 in miniature ({stem})\n\n" + markdown_report(result, table))
    if with_figure and result["runs"]:
        paths.append(figure(result, os.path.join(out_dir, stem + ".png")))
    return paths
