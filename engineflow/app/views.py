"""How ``engineflow runs`` shows runs: readable tables, or JSON for scripts."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engineflow.app.report import format_value, plural
from engineflow.declare.configuration import flatten

SUMMARY_KEYS = ("id", "experiment", "status", "config", "metrics", "best", "run_dir", "started_at", "ended_at",
                "code", "seed", "epochs", "error", "env", "artifacts", "resumes")


def public(record: Mapping[str, Any]) -> dict[str, Any]:
    """The scripting contract's view of a record (see ``runs list --json``)."""
    out = {key: record.get(key) for key in SUMMARY_KEYS}
    out["metrics"] = out["metrics"] or {}
    out["best"] = out["best"] or {"epoch": None, "metric": None, "value": None}
    code = record.get("code") or {}
    out["code"] = {"fingerprint": code.get("fingerprint"), "git_commit": code.get("git_commit"),
                   "dirty": code.get("dirty", False), "files": code.get("files", [])}
    out["stages"] = stages_of(record, out)
    out["world_size"] = record.get("world_size") or 1  # runs before distributed training: one process
    out["backend"] = record.get("backend")
    out["exact_resume"] = record.get("exact_resume")  # None: recorded before engineflow recorded it
    out["deterministic"] = bool(record.get("deterministic"))  # absent before --deterministic: off
    out["precision"] = record.get("precision")  # None: stages of several precisions, or recorded before
    out["step_options"] = record.get("step_options") or {}
    out["model"] = record.get("model")  # the parameter summary; None: recorded before engineflow kept it
    out["sweep"] = record.get("sweep")  # {study, trial, params} of a sweep's trial; None: a plain run
    if "history" in record:
        out["history"] = record["history"]
    return out


def stages_of(record: Mapping[str, Any], view: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The run's stages in order, each with ``name``, ``kind``, ``status``, ``epochs`` (completed in the
    stage), ``best`` (its epoch counted within the stage) and ``metrics``; a run of a recipe without
    stages, and a run recorded before stages existed, is one stage, "fit".

    Example:
        >>> (stage,) = stages_of({"status": "completed", "epochs": 3}, {"best": {"epoch": 2}, "metrics": {}})
        >>> stage
        {'name': 'fit', 'kind': 'train', 'status': 'completed', 'epochs': 3, 'best': {'epoch': 2}, 'metrics': {}}
    """
    if isinstance(record.get("stages"), list) and record["stages"]:
        return list(record["stages"])
    stopped = {"stopped": record["stopped"]} if record.get("stopped") else {}  # by early stopping
    return [{"name": "fit", "kind": "train", "status": record.get("status"), "epochs": record.get("epochs") or 0,
             "best": view["best"], "metrics": view["metrics"], **stopped}]


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(c) for c in header], *[[_cell(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return "-" if value is None else format_value(value)


def list_table(records: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for r in records:
        best = r.get("best") or {}
        main = f"{best.get('metric')}={format_value(best['value'])}" if best.get("value") is not None else "-"
        rows.append([r["id"], r["experiment"], r["status"], (r.get("started_at") or "")[:19].replace("T", " "),
                     r.get("epochs"), main])
    return table(rows, ["id", "experiment", "status", "started", "epochs", "best"]) if rows else "no runs yet"


def sweep_text(study: Mapping[str, Any], importances: Mapping[str, float]) -> str:
    """A study as ``sweep show`` prints it: a row per trial, the best trial, the parameters' importances."""
    rows = [[t["number"], t["state"], ", ".join(f"{k}={format_value(v)}" for k, v in t["params"].items()),
             "-" if t["value"] is None else format_value(t["value"]), t["epochs"], t["run_id"] or "-"]
            for t in study["trials"]]
    lines = [f"study {study['study']} ({study['direction']} {study['metric'] or 'value'}): "
             f"{plural(len(rows), 'trial')}"]
    if rows:
        lines.append(table(rows, ["trial", "state", "params", "value", "epochs", "run"]))
    best = study["best"]
    if best is not None:
        lines.append(f"best: trial {best['number']} (run {best['run_id']}), value {format_value(best['value'])}")
    if importances:
        lines.append("importance: " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()))
    return "\n".join(lines)


def show_text(record: Mapping[str, Any]) -> str:
    best = record.get("best") or {}
    code = record.get("code") or {}
    lines = [
        f"run {record['id']}  ({record['experiment']})  {record['status']}",
        f"  started {record.get('started_at')}  ended {record.get('ended_at')}",
        f"  folder  {record.get('run_dir')}",
        f"  code    {code.get('git_commit') or 'not in git'}{' (dirty)' if code.get('dirty') else ''}  "
        f"fingerprint {str(code.get('fingerprint'))[:12]}",
        f"  seed    {record.get('seed')}   device {(record.get('env') or {}).get('device')}",
    ]
    if best.get("epoch") is not None:
        lines.append(f"  best    epoch {best['epoch']}: {best['metric']} = {format_value(best['value'])} "
                     f"({best['mode']})")
    if record.get("error"):
        lines.append(f"  error   {record['error']}")
    stages = record.get("stages") or []
    if len(stages) > 1 or any(s.get("name") != "fit" for s in stages):
        lines.append("stages:")
        for stage in stages:
            best = stage.get("best") or {}
            main = f"  best {best['metric']} = {format_value(best['value'])} (epoch {best['epoch']})" \
                if best.get("value") is not None else ""
            origin = f"  from run {stage['from']}" if stage.get("from") else ""
            lines.append(f"  {stage['name']}  {stage.get('kind', 'train')}  {stage['status']}  "
                         f"{plural(stage.get('epochs') or 0, 'epoch')}{main}{origin}")
    lines.append("config:")
    lines += [f"  {k} = {v!r}" for k, v in flatten(record.get("config") or {}).items()]
    lines.append("metrics (last epoch):")
    lines += [f"  {k} = {format_value(v)}" for k, v in (record.get("metrics") or {}).items()]
    return "\n".join(lines)


def compare(*records: Mapping[str, Any]) -> dict[str, Any]:
    """Config differences and the metrics of runs side by side: each value is a list, one entry per
    run in the order given (``runs``); ``config`` holds the keys whose values are not all the same.

    Example:
        >>> a = {"id": "a", "config": {"lr": 0.1, "epochs": 2}, "metrics": {"acc": 0.9}, "best": {}}
        >>> b = {"id": "b", "config": {"lr": 0.5, "epochs": 2}, "metrics": {"acc": 0.8}, "best": {}}
        >>> compare(a, b)["config"], compare(a, b)["metrics"]
        ({'lr': [0.1, 0.5]}, {'acc': [0.9, 0.8]})
    """
    configs = [flatten(r.get("config") or {}) for r in records]
    keys = sorted(set().union(*configs))
    values = {k: [c.get(k) for c in configs] for k in keys}
    config = {k: v for k, v in values.items() if any(x != v[0] for x in v[1:])}
    metrics_of = [r.get("metrics") or {} for r in records]
    metrics = {k: [m.get(k) for m in metrics_of] for k in sorted(set().union(*metrics_of))}
    return {"runs": [r["id"] for r in records], "config": config, "metrics": metrics,
            "best": [r.get("best") for r in records]}


def compare_text(diff: Mapping[str, Any]) -> str:
    ids = diff["runs"]
    parts = ["config differences:"]
    parts.append(table([[k, *v] for k, v in diff["config"].items()], ["key", *ids]) if diff["config"]
                 else "  (same config)")
    parts.append("metrics (last epoch):")
    parts.append(table([[k, *v] for k, v in diff["metrics"].items()], ["metric", *ids]))
    return "\n".join(parts)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        from engineflow.errors import RecipeError

        raise RecipeError("runs plot needs matplotlib: pip install 'engineflow[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(records: Sequence[Mapping[str, Any]], out: Path) -> None:
    """Draw each run's per-epoch metrics, one panel per metric name (needs matplotlib)."""
    plt = _pyplot()
    fig = plot_figure(records)
    fig.savefig(out)
    plt.close(fig)


def plot_figure(records: Sequence[Mapping[str, Any]]) -> Any:
    """The figure :func:`plot` saves: a panel per metric, a curve per run labelled by what differs
    between the runs (:func:`run_labels`), whole-number epochs, and each run's best epoch marked
    with a star."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    names = sorted({k for r in records for row in r.get("history", []) for k in row if k != "epoch"})
    labels = run_labels(records)
    fig, axes = plt.subplots(len(names) or 1, 1, figsize=(7, 2.6 * max(len(names), 1)), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=False):
        for r, label in zip(records, labels, strict=True):
            points = [(row["epoch"], row[name]) for row in r.get("history", []) if name in row]
            if not points:
                continue
            (line,) = ax.plot(*zip(*points, strict=True), marker=".", label=label)
            best = (r.get("best") or {}).get("epoch")
            at_best = [value for epoch, value in points if epoch == best]
            if at_best:
                ax.plot([best], at_best, marker="*", markersize=12, color=line.get_color(), linestyle="none",
                        label="_best epoch")
        ax.set_title(name)
        ax.set_xlabel("epoch (★ best)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def run_labels(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """A label per run: the config values that differ between the runs (``lr=0.1, hidden=64``; the
    seed only when nothing else differs), else (one run, or runs of one config) its id; runs of one
    label get their ids too.

    Example:
        >>> run_labels([{"id": "a", "config": {"lr": 0.1, "hidden": 64, "epochs": 3}},
        ...             {"id": "b", "config": {"lr": 0.01, "hidden": 64, "epochs": 3}}])
        ['lr=0.1', 'lr=0.01']
    """
    configs = [flatten(r.get("config") or {}) for r in records]
    keys = sorted({k for c in configs for k in c})
    differing = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]
    if len(differing) > 1 and "seed" in differing:  # a sweep's trials all have seeds of their own
        differing.remove("seed")
    if len(records) < 2 or not differing:
        return [str(r["id"]) for r in records]
    labels = [", ".join(f"{k}={format_value(c.get(k))}" for k in differing) for c in configs]
    return [f"{label} ({r['id']})" if labels.count(label) > 1 else label for label, r in zip(labels, records,
                                                                                          strict=True)]


def plot_activations(record: Mapping[str, Any], out: Path) -> None:
    """Draw a run's activation statistics, one row per layer: the histogram over the iterations ("colorful
    dimension": x the iteration, y the value, colour the log of the count), the mean and std, and the share
    of near-zero values (needs matplotlib)."""
    from engineflow.errors import RecipeError
    from engineflow.execute.activations import DATA_FILE, read_activations

    lines = read_activations(Path(record["run_dir"]))
    if not lines:
        raise RecipeError(f"run {record['id']} has no activation statistics (no {DATA_FILE} in {record['run_dir']}); "
                          "declare ef.hooks.activation_stats() in its recipe and train it")
    plt = _pyplot()
    import numpy as np

    layers: dict[str, list[Mapping[str, Any]]] = {}
    for line in lines:
        layers.setdefault(line["layer"], []).append(line)
    fig, axes = plt.subplots(len(layers), 3, figsize=(13, 2.4 * len(layers)), squeeze=False,
                             gridspec_kw={"width_ratios": [2, 1, 1]})
    for row, (layer, series) in zip(axes, layers.items(), strict=True):
        last = series[-1]
        # a layer recorded with another binning (another stage's declaration) would not line up: the last one's
        series = [s for s in series if s["range"] == last["range"] and len(s["histogram"]) == len(last["histogram"])]
        iterations = [s["iteration"] for s in series]
        low, high = last["range"]
        bins = len(last["histogram"])
        centres = low + (np.arange(bins) + 0.5) * (high - low) / bins
        counts = np.log1p(np.array([s["histogram"] for s in series], dtype=float).T)
        row[0].pcolormesh(iterations, centres, counts, shading="nearest", cmap="viridis")
        row[0].set_title(f"{layer}: histogram (log count)")
        row[0].set_ylabel("value")
        row[1].plot(iterations, [s["mean"] for s in series], marker=".", label="mean")
        row[1].plot(iterations, [s["std"] for s in series], marker=".", label="std")
        row[1].set_title(f"{layer}: mean and std")
        row[1].legend(fontsize="small")
        row[2].plot(iterations, [s["near_zero"] for s in series], marker=".", color="tab:red")
        row[2].set_title(f"{layer}: share near zero")
        row[2].set_ylim(-0.02, 1.02)
    for ax in axes[-1]:
        ax.set_xlabel("iteration")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
