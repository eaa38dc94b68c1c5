"""A sweep's runs, aggregated: runs that differ only in their seed form one cell; each cell reports the test accuracy
of the factorized model as mean ± std over its finished seeds and counts its failed runs; each method at each
compression point keeps the lr with the best mean validation accuracy; each method is then compared with
``decompose_finetune`` at the same point, in points of test accuracy.

A run is a row of ``collect.collect_rows``: ``method``, ``point``, ``seed``, ``lr``, ``status``, the accuracies,
and ``settings`` (its flattened config without seed and lr). The ``variant`` of a run is the part of its settings
that varies across the sweep outside the point (e.g. ``lowrank.every_n_train_steps=50``)."""
from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from typing import Any

from ..rules import record_of, rule_label

METHOD = "lowrank_projection"
BASELINE = "decompose_finetune"
METHOD_ALIASES = {"deeptwist": METHOD}  # names older summaries used for the method
METHOD_ORDER = (METHOD, BASELINE, "decompose", "dense")
OK, COLLAPSED, DIVERGED = "ok", "collapsed", "diverged"
FINISHED = (OK, COLLAPSED)  # statuses whose accuracy counts in the mean
# A train config's ``lowrank`` node: the plan is its scheme, rank rule, layer selection and solver; the objective is
# how projections are made; everything else is the callback's schedule and stabilizers, which do not change the plan
# (so they are no part of the point, and runs of the other methods ignore them). Configs of older runs named these
# options flat (``lowrank.budget``, ``lowrank.tile_shape``, ...): ``LEGACY_*`` reads them.
PLAN_GROUPS = frozenset({"scheme", "rank", "layers", "solver"})
OBJECTIVE_GROUPS = frozenset({"objective"})
LEGACY_RULE_KEYS = ("energy", "compression", "budget", "budget_metric")
LEGACY_PLAN_KEYS = frozenset({*LEGACY_RULE_KEYS, "tile_shape", "include", "exclude", "linear", "skip_first_conv",
                              "hooi_iters", "svd_driver", "projection_device", "input_shape", "rank_multiple",
                              "budget_objective", "latency_batch_size", "latency_device", "latency_cache",
                              "latency_remeasure"})
LEGACY_OBJECTIVE_KEYS = frozenset({"activation_ridge", "bn_weighting"})
# Job settings that change how fast a run goes, and its result only under a latency budget (they choose the
# latency table the ranks are allocated from).
SPEED_KEYS = {"latency_batch_size", "latency_batch_sizes", "retain_freed_memory"}
SPEEDUP_KEYS = ("speedup", "speedup_low", "speedup_high")  # measured speedup and its interquartile range
RULE_FIELDS = ("lowrank.rank", "lowrank.rank._target_", "lowrank.rank.factor", "lowrank.rank.metric",
               "lowrank.rank.fraction")
HIDDEN_KEYS = {"seed", "model.lr", "baseline", "lowrank._target_", "lowrank.scheme", "lowrank.scheme._target_",
               *RULE_FIELDS, *(f"lowrank.{key}" for key in LEGACY_RULE_KEYS)}


def lowrank_group(key: str) -> str | None:
    """The option of a ``lowrank`` node a flattened key belongs to (``lowrank.rank.factor`` -> ``rank``)."""
    return key.split(".")[1] if key.startswith("lowrank.") and key.count(".") >= 1 else None


def is_callback_key(key: str) -> bool:
    """Whether a flattened config key is a setting of the callback alone (schedule, stabilizers)."""
    group = lowrank_group(key)
    return group is not None and group != "_target_" and group not in (
        PLAN_GROUPS | OBJECTIVE_GROUPS | LEGACY_PLAN_KEYS | LEGACY_OBJECTIVE_KEYS)


def is_objective_key(key: str) -> bool:
    return lowrank_group(key) in OBJECTIVE_GROUPS | LEGACY_OBJECTIVE_KEYS


def target_name(node: Any) -> str:
    """The class name a ``_target_`` node builds (``lrlightning.Budget`` -> ``Budget``)."""
    return str(node.get("_target_", "")).rsplit(".", 1)[-1] if isinstance(node, dict) else ""


def config_rule(lowrank: dict[str, Any]) -> dict[str, Any] | None:
    """The rank rule of a ``lowrank`` config as ``lrlightning.rules.rule_record`` writes it; None without one."""
    rank = lowrank.get("rank")
    kind = target_name(rank)
    if kind in ("Budget", "Energy", "Compression"):
        return record_of(kind, {key: value for key, value in rank.items() if key != "_target_"})
    if lowrank.get("budget") is not None:
        return {"budget": lowrank["budget"], "metric": lowrank.get("budget_metric", "params")}
    if rank is not None:
        return {"rank": rank}
    for key in ("compression", "energy"):
        if lowrank.get(key) is not None:
            return {key: lowrank[key]}
    return None


def config_scheme(lowrank: dict[str, Any]) -> str | None:
    """The scheme name of a ``lowrank`` config: a name, or the registered name of the class a node builds."""
    scheme = lowrank.get("scheme")
    if isinstance(scheme, dict):
        from ..schemes import SCHEMES

        names = {cls.__name__: name for name, cls in SCHEMES.items()}
        return names.get(target_name(scheme), target_name(scheme) or None)
    return scheme


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b": value}``; lists as JSON text."""
    if not isinstance(node, dict):
        return {prefix: json.dumps(node) if isinstance(node, list) else node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def method_of(config: dict[str, Any]) -> str:
    """The method a train config runs: its ``baseline``, else ``lowrank_projection`` with a low-rank preset, else
    ``dense``."""
    if config.get("baseline"):
        return str(config["baseline"])
    return METHOD if config.get("lowrank") else "dense"


def point_label(scheme: str | None, rule: dict[str, Any] | None) -> str | None:
    """A compression point: ``scheme:rank``, ``scheme:Nx`` (compression), ``scheme:budget=Bx METRIC`` or
    ``scheme:energy=e`` (``rule_label``); None without a scheme or rule."""
    if scheme is None or rule is None:
        return None
    return f"{scheme}:{rule_label(rule)}"


def point_of(lowrank: dict[str, Any]) -> str | None:
    """The compression point of a ``lowrank`` config."""
    return point_label(config_scheme(lowrank), config_rule(lowrank))


def summary_point(summary: dict[str, Any]) -> str | None:
    """The point of a summary whose config holds no scheme (``lrl-export`` runs): its scheme and rule record."""
    rule = summary.get("rule") or ({"rank": summary["rank"]} if summary.get("rank") is not None else None)
    return point_label(summary.get("scheme"), rule)


def describe_run(config: dict[str, Any]) -> dict[str, Any]:
    """``method``, ``point``, ``seed``, ``lr`` and ``settings`` of a run from its resolved train config."""
    method = method_of(config)
    flat = flatten(config)
    latency = (config_rule(config.get("lowrank") or {}) or {}).get("metric") == "latency"
    settings = {k: v for k, v in flat.items()
                if k not in ("seed", "model.lr") and (method == METHOD or not is_callback_key(k))
                and (latency or k not in SPEED_KEYS)}
    return {"method": method, "point": point_of(config.get("lowrank") or {}), "seed": flat.get("seed"), "lr": flat.get("model.lr"),
            "settings": settings}


def varies(key: str, rows: list[dict[str, Any]]) -> bool:
    """Whether ``key`` takes more than one value (absent counts as one) among the runs of one method, or, for a
    setting that is not the callback's, among all runs."""
    def values(group: list[dict[str, Any]]) -> set[str]:
        return {json.dumps(row.get("settings", {}).get(key, "-"), default=str) for row in group}
    methods = {row["method"] for row in rows}
    return (any(len(values([r for r in rows if r["method"] == m])) > 1 for m in methods)
            or (not is_callback_key(key) and len(values(rows)) > 1))


def label_variants(rows: list[dict[str, Any]]) -> None:
    """Sets each row's ``variant``: its settings that vary across the rows with a point (see ``varies``), outside
    seed, lr, method and the rank rule, as ``key=value`` text; the point gains the plan settings that vary
    (``tile_shape``; not the projection objective's). Rows without a point (dense runs) get an empty variant."""
    compressed = [row for row in rows if row.get("point")]
    keys = sorted({key for row in compressed for key in row.get("settings", {})})
    varying = [k for k in keys if k not in HIDDEN_KEYS and varies(k, compressed)]
    for row in rows:
        settings = row.get("settings", {})
        plan = [k for k in varying if k.startswith("lowrank.") and not is_callback_key(k)
                and not is_objective_key(k) and k in settings]
        if row.get("point") and plan:
            row["point"] += " " + " ".join(f"{k.removeprefix('lowrank.')}={settings[k]}" for k in plan)
        row["variant"] = " ".join(f"{k}={settings[k]}" for k in varying if k in settings and k not in plan)


def method_order(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def lr_order(lr: Any) -> tuple[bool, float]:
    return (lr is not None, float(lr) if lr is not None else 0.0)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one value); (nan, nan) for none."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def percent(value: Any) -> float:
    return 100.0 * float(value) if value is not None else math.nan


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One cell per (point, method, variant, lr) over the rows with a point: runs, finished seeds (collapsed runs
    included, diverged and unfinished ones not), failed runs (all but ``ok``), mean val and test accuracy (%), test
    std, mean model compression; ``chosen`` marks the lr with the best mean validation accuracy of each (point,
    method, variant), ``failed_all_lrs`` counts failures at every lr."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("point") is not None:
            groups.setdefault((row["point"], row["method"], row.get("variant", ""), row.get("lr")), []).append(row)
    cells = []
    for (point, method, variant, lr), runs in groups.items():
        finished = [r for r in runs if r["status"] in FINISHED]
        tests = [percent(r["test_acc_factorized"]) for r in finished]
        vals = [percent(r.get("val_acc_factorized")) for r in finished]
        test_mean, test_std = mean_std([v for v in tests if math.isfinite(v)])
        ratios = [float(r["model_compression_ratio"]) for r in finished if r.get("model_compression_ratio")]
        jumps = {key: [r[key] for r in finished if r.get(key) is not None] for key in ("first_loss_jump", "loss_jump")}
        speed = {key: [float(r[key]) for r in finished if r.get(key) not in (None, "")] for key in SPEEDUP_KEYS}
        cells.append({"point": point, "method": method, "variant": variant, "lr": lr, "runs": len(runs),
                      "seeds": len(finished), "failed": sum(r["status"] != OK for r in runs),
                      "val_mean": mean_std([v for v in vals if math.isfinite(v)])[0], "test_mean": test_mean,
                      "test_std": test_std, "model_compression_ratio": statistics.fmean(ratios) if ratios else None,
                      **{key: statistics.fmean(values) if values else None for key, values in jumps.items()},
                      **{key: statistics.fmean(values) if len(values) == len(finished) and values else None
                         for key, values in speed.items()}})
    for family in {(c["point"], c["method"], c["variant"]) for c in cells}:
        members = sorted((c for c in cells if (c["point"], c["method"], c["variant"]) == family),
                         key=lambda c: lr_order(c["lr"]))
        best = max(members, key=lambda c: c["val_mean"] if math.isfinite(c["val_mean"]) else -math.inf)
        for cell in members:
            cell["chosen"] = cell is best
            cell["failed_all_lrs"] = sum(c["failed"] for c in members)
            cell["runs_all_lrs"] = sum(c["runs"] for c in members)
    return sorted(cells, key=lambda c: (c["model_compression_ratio"] or 0.0, c["point"], method_order(c["method"]),
                                        c["variant"], lr_order(c["lr"])))


def shared_variant(variant: str) -> str:
    """A variant without the callback-only settings: what a baseline run must share to be compared with it."""
    return " ".join(item for item in variant.split() if not is_callback_key(item.split("=", 1)[0]))


def label(cell: dict[str, Any]) -> str:
    return cell["method"] + (f" ({cell['variant']})" if cell["variant"] else "")


def verdicts(cells: Iterable[dict[str, Any]]) -> list[str]:
    """Per point, each method (at its chosen lr) against decompose_finetune with the same shared settings: the
    difference in points of test accuracy, called ahead/behind only beyond one std, and the best method among
    those with at least two seeds and at least as many as the baseline (a one-seed probe is never called best)."""
    chosen = [c for c in cells if c["chosen"] and math.isfinite(c["test_mean"])]
    lines = []
    for point in dict.fromkeys(c["point"] for c in chosen):
        here = [c for c in chosen if c["point"] == point]
        for base in (c for c in here if c["method"] == BASELINE):
            rivals = [c for c in here if c["method"] not in (BASELINE, "dense")
                      and shared_variant(c["variant"]) == base["variant"]]
            for cell in rivals:
                gap = cell["test_mean"] - base["test_mean"]
                if min(cell["seeds"], base["seeds"]) < 2:
                    word = "compared on one seed (no spread to judge by) with"
                else:
                    noise = max(cell["test_std"], base["test_std"])
                    word = "ahead of" if gap > noise else "behind" if -gap > noise else "level (within one std) with"
                lines.append(f"{point}: {label(cell)} {cell['test_mean']:.2f} is {word} {label(base)} "
                             f"{base['test_mean']:.2f} ({gap:+.2f} pt)")
            contenders = [c for c in rivals if c["seeds"] >= max(2, base["seeds"])]
            if contenders:
                best = max(contenders, key=lambda c: c["test_mean"])
                lines.append(f"{point}: best {label(best)} {best['test_mean']:.2f}, "
                             f"{best['test_mean'] - base['test_mean']:+.2f} pt against {label(base)}")
        lines += best_of_each(here, point)
    return lines


def best_of_each(cells: list[dict[str, Any]], point: str) -> list[str]:
    """When ``decompose_finetune`` ran in several variants at ``point`` (e.g. both projection objectives): each
    other method's best cell (at least two seeds) against the best baseline cell."""
    bases = [c for c in cells if c["method"] == BASELINE and c["seeds"] >= 2]
    if len(bases) < 2:
        return []
    base = max(bases, key=lambda c: c["test_mean"])
    lines = []
    for method in dict.fromkeys(c["method"] for c in cells if c["method"] not in (BASELINE, "dense")):
        own = [c for c in cells if c["method"] == method and c["seeds"] >= 2]
        if own:
            best = max(own, key=lambda c: c["test_mean"])
            lines.append(f"{point}: best of {method}, {label(best)} {best['test_mean']:.2f}, against the best "
                         f"{label(base)} {base['test_mean']:.2f}: {best['test_mean'] - base['test_mean']:+.2f} pt")
    return lines


def fmt_lr(lr: Any) -> str:
    return "-" if lr is None else f"{lr:g}" if isinstance(lr, (int, float)) else str(lr)


def fmt_acc(mean: float, std: float | None = None) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def fmt_speedup(cell: dict[str, Any]) -> str:
    """A cell's measured speedup (mean over its seeds) with the mean interquartile range of its runs, e.g.
    ``1.31x (1.27-1.34)``; ``-`` when a run recorded none, the range left out where runs did not record it."""
    if cell.get("speedup") is None:
        return "-"
    if cell.get("speedup_low") is None or cell.get("speedup_high") is None:
        return f"{cell['speedup']:.2f}x"
    return f"{cell['speedup']:.2f}x ({cell['speedup_low']:.2f}-{cell['speedup_high']:.2f})"


def chosen_table(cells: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the chosen-lr table."""
    header = ["point", "model ratio", "method", "variant", "lr", "val acc %", "test acc %", "seeds", "failed",
              "failed (all lrs)"]
    rows = [[c["point"], f"{c['model_compression_ratio']:.2f}x" if c["model_compression_ratio"] else "-", c["method"],
             c["variant"] or "-", fmt_lr(c["lr"]), fmt_acc(c["val_mean"]), fmt_acc(c["test_mean"], c["test_std"]),
             f"{c['seeds']}/{c['runs']}", f"{c['failed']}/{c['runs']}", f"{c['failed_all_lrs']}/{c['runs_all_lrs']}"]
            for c in cells if c["chosen"]]
    if any(c.get("speedup") is not None for c in cells if c["chosen"]):
        header += ["speedup (IQR)"]
        for row, c in zip(rows, [c for c in cells if c["chosen"]]):
            row.append(fmt_speedup(c))
    if any(c.get("loss_jump") is not None for c in cells if c["chosen"]):
        header += ["loss jump (first / mean)"]
        jumps = [c for c in cells if c["chosen"]]
        for row, c in zip(rows, jumps):
            row.append("-" if c.get("loss_jump") is None else f"{c['first_loss_jump']:+.3f} / {c['loss_jump']:+.3f}")
    return header, rows


def lr_table(cells: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]] | None:
    """Test accuracy % at every lr (mean ± std /finished seeds) when the sweep has more than one lr; else None."""
    lrs = sorted({c["lr"] for c in cells}, key=lr_order)
    if len(lrs) < 2:
        return None
    families = list(dict.fromkeys((c["point"], c["method"], c["variant"]) for c in cells))
    rows = []
    for family in families:
        by_lr = {c["lr"]: c for c in cells if (c["point"], c["method"], c["variant"]) == family}
        rows.append([family[0], family[1], family[2] or "-", *(
            f"{fmt_acc(by_lr[lr]['test_mean'], by_lr[lr]['test_std'])} /{by_lr[lr]['seeds']}" if lr in by_lr else "-"
            for lr in lrs)])
    return ["point", "method", "variant", *(f"lr {fmt_lr(lr)}" for lr in lrs)], rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table (``|`` in cells escaped)."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"
    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


def report(cells: list[dict[str, Any]]) -> str:
    """Markdown: the chosen-lr table, the verdict lines, and the every-lr table when there are several lrs."""
    text = markdown_table(*chosen_table(cells))
    lines = verdicts(cells)
    if lines:
        text += "\n\n" + "\n".join(f"- {line}" for line in lines)
    every_lr = lr_table(cells)
    if every_lr:
        text += "\n\nTest accuracy % at every lr (mean ± std /finished seeds):\n\n" + markdown_table(*every_lr)
    return text + "\n"
