"""The evaluation harness: pretraining methods × probes, k-fold or few-shot, on labeled CT.

For each backbone (a pretraining method, or one backbone per number of diffusion timesteps for the ablation)
and each probe head, a probe is trained on the training cases of a split and segments the held-out cases;
Dice and HD95 are measured on each case's own grid against its manual labels. Two regimes:

* ``kfold``: the paper's setting, e.g. 5-fold cross-validation over the 20 BTCV cases;
* ``fewshot``: probes trained on 1, 2, 5 … labeled cases (``repeats`` random draws each), tested on the rest.

The results dict has per-case metrics, summaries and report rows; :func:`write_evaluation` turns it into
JSON, a markdown table and PNG plots (the timestep ablation when the backbones differ in T).

With ``reuse_dir``, each backbone's per-case results are saved there as soon as it is done, under a key made of
everything that determines them (the weights' and BPR's hashes, the cases and splits, the organs, the evaluation
and probe configs, the device kind); a later run with the same key takes them instead of recomputing. An interrupted comparison
resumes at the backbone it was on, and a backbone added to a comparison costs only its own evaluation. The code
version is not part of the key (each saved file records its commit, and the report lists what it reused).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from DiffusionSegLib.data.datasets import LabeledCase
from DiffusionSegLib.data.labels import OrganLabel
from DiffusionSegLib.defaults import LARGEST_COMPONENT
from DiffusionSegLib.errors import UserInputError

__all__ = ["EvaluationConfig", "evaluate", "make_splits", "reuse_key", "timestep_curves", "write_evaluation"]

log = logging.getLogger(__name__)


@dataclass
class EvaluationConfig:
    regime: Literal["kfold", "fewshot"] = "kfold"
    """k-fold cross-validation over all cases, or few-shot training sets with the rest as test cases."""
    folds: int = 5
    """Number of folds (kfold)."""
    shots: tuple[int, ...] = (1, 2, 5)
    """Training-set sizes (fewshot)."""
    repeats: int = 1
    """Random training sets drawn per shot count (fewshot)."""
    max_test_cases: int = 0
    """Cap on test cases per split (0: all)."""
    heads: tuple[str, ...] = ("linear", "nonlinear")
    """Probe heads to evaluate."""
    seed: int = 0
    largest_component: bool = LARGEST_COMPONENT
    """Keep each organ's largest connected component before scoring (default on, as ``segment`` does:
    :data:`DiffusionSegLib.defaults.LARGEST_COMPONENT`)."""

    def __post_init__(self) -> None:
        if self.regime == "kfold" and self.folds < 2:
            raise ValueError(f"folds {self.folds} must be at least 2")
        if self.regime == "fewshot" and (not self.shots or min(self.shots) < 1):
            raise ValueError(f"shots {self.shots} must be positive")


def make_splits(case_ids: Sequence[str], cfg: EvaluationConfig) -> list[dict]:
    """Deterministic train/test splits: ``[{"name", "regime", "n_labeled", "train": [...], "test": [...]}]``."""
    ids = list(case_ids)
    rng = np.random.default_rng(cfg.seed)
    splits = []
    if cfg.regime == "kfold":
        if len(ids) < cfg.folds:
            raise UserInputError(f"{len(ids)} labeled cases cannot make {cfg.folds} folds")
        order = list(rng.permutation(ids))
        for fold, test in enumerate(np.array_split(order, cfg.folds)):
            test = [str(c) for c in test]
            train = [c for c in order if c not in test]
            splits.append({"name": f"fold{fold + 1}", "regime": f"{cfg.folds}-fold", "n_labeled": len(train),
                           "train": train, "test": test})  # fmt: skip
    else:
        for shots in cfg.shots:
            if shots >= len(ids):
                raise UserInputError(f"{shots}-shot needs more than {shots} labeled cases; found {len(ids)}")
            for repeat in range(cfg.repeats):
                order = [str(c) for c in rng.permutation(ids)]
                splits.append({"name": f"{shots}shot_r{repeat + 1}", "regime": f"{shots} labeled",
                               "n_labeled": shots, "train": order[:shots], "test": order[shots:]})  # fmt: skip
    for split in splits:
        if cfg.max_test_cases:
            split["test"] = split["test"][: cfg.max_test_cases]
    return splits


def reuse_key(backbone, cfg: EvaluationConfig, probe_config, organs: Sequence[OrganLabel], splits: Sequence[dict],
              device: str = "cpu") -> str:  # fmt: skip
    """Hash of everything that determines a backbone's per-case results (see the module docstring); ``device``
    is the kind the work runs on (``"cpu"``, ``"cuda"``): GPU and CPU results differ in the last digits."""
    facts = {"backbone": backbone.sha256, "bpr": backbone.bpr_sha256, "evaluation": asdict(cfg),
             "probe": asdict(probe_config), "organs": [[o.value, o.name] for o in organs],
             "splits": [[s["name"], s["train"], s["test"]] for s in splits], "device": str(device)}  # fmt: skip
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _load_reused(path: Path, method: str) -> tuple[list[dict], dict] | None:
    """The saved rows (renamed to ``method``) and their provenance; ``None`` (with a warning) if unreadable."""
    try:
        saved = json.loads(path.read_text())
        rows = [dict(row, method=method) for row in saved["per_case"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("cannot reuse %s (%s); computing %s again", path, error, method)
        return None
    return rows, {"file": str(path), "git_commit": saved.get("git_commit"), "library": saved.get("library")}


def _save_reusable(path: Path, backbone, rows: list[dict], seconds: float) -> None:
    from DiffusionSegLib.checkpoint import atomic_write, git_commit, library_version
    from DiffusionSegLib.evaluate.report import to_json_safe

    payload = {"key": path.stem, "backbone": str(backbone.path), "sha256": backbone.sha256, "per_case": rows,
               "seconds": round(seconds, 1), "git_commit": git_commit(), "library": library_version()}  # fmt: skip
    text = json.dumps(to_json_safe(payload), indent=1, allow_nan=False)
    atomic_write(path, lambda temporary: Path(temporary).write_text(text))


def evaluate(cases: Sequence[LabeledCase], backbones: Mapping[str, object], cfg: EvaluationConfig,
             probe_config=None, *, organs: Sequence[OrganLabel] | None = None,
             progress: Callable[[str], None] | None = None, reuse_dir: str | Path | None = None) -> dict:  # fmt: skip
    """Run the comparison.

    Work is shared wherever the result cannot change: per backbone, each training case is prepared and its
    patches' features cached once (its patches are drawn from a generator seeded by the case, so they are the
    same in every split), and every head of a split is trained on that cache; each test case is prepared and
    passed through the backbone once for all heads of its split (:func:`~DiffusionSegLib.probe.segment_with_probes`).

    Args:
        cases: labeled cases (manual labels for reported numbers).
        backbones: ``{method name: BackboneBundle}``.
        cfg: splits, heads and scoring options.
        probe_config: a :class:`~DiffusionSegLib.probe.ProbeConfig` used for every probe (its ``head`` is
            replaced by each of ``cfg.heads``).
        organs: the organs to learn and score (default: the labels of the first case).
        progress: called with a line of text after each probe and test case.
        reuse_dir: save each backbone's per-case results here, and take them from here when a file with the
            same :func:`reuse_key` exists (``None``: always compute, save nothing).

    Returns:
        ``{"config", "splits", "per_case": [...], "summaries": {...}, "rows": [...], "timings": {...},
        "reused": {method: {"file", "git_commit", "library"}}}``.
    """
    import SimpleITK as sitk

    from DiffusionSegLib.data.gate import read_ct, read_label_map
    from DiffusionSegLib.evaluate.metrics import organ_metrics, summarise
    from DiffusionSegLib.evaluate.report import row_from_summary
    from DiffusionSegLib.features import FeatureExtractor, resolve_device
    from DiffusionSegLib.probe import ProbeConfig, cache_patch_features, segment_with_probes, train_head
    from DiffusionSegLib.probe.sampling import prepare_labeled_volume, sample_patch_origins

    if not cases:
        raise UserInputError("no labeled cases to evaluate on")
    if not backbones:
        raise UserInputError("no backbones to evaluate")
    say = progress or log.info
    organs = list(organs or cases[0].labels)
    by_id = {case.case_id: case for case in cases}
    splits = make_splits(list(by_id), cfg)
    needed = sorted({c for split in splits for c in split["train"] + split["test"]})
    images: dict[str, tuple] = {}  # read on first use (not at all when every backbone's results are reused)

    def image_and_label(case_id: str) -> tuple:
        if case_id not in images:
            ct = read_ct(by_id[case_id].image)
            images[case_id] = (ct, read_label_map(by_id[case_id].label, ct, list(by_id[case_id].labels) or None))
        return images[case_id]

    training_cases = sorted({c for split in splits for c in split["train"]})
    base = probe_config or ProbeConfig()
    head_configs = {head: replace(base, head=head) for head in cfg.heads}
    feature_cfg = base.feature_config()
    device = resolve_device(base.device)
    per_case: list[dict] = []
    timings: dict[str, float] = {"cache_features_s": 0.0, "train_probe_s": 0.0, "segment_s": 0.0}
    reused: dict[str, dict] = {}
    for method, backbone in backbones.items():
        reuse_path = None
        if reuse_dir is not None:
            reuse_path = Path(reuse_dir) / f"{reuse_key(backbone, cfg, base, organs, splits, device.type)}.json"
            loaded = _load_reused(reuse_path, method) if reuse_path.exists() else None
            if loaded is not None:
                per_case += loaded[0]
                reused[method] = loaded[1]
                say(f"{method}: results reused from {reuse_path}")
                continue
        backbone_started = started = time.perf_counter()
        backbone_rows: list[dict] = []
        extractor = FeatureExtractor(backbone, feature_cfg).to(device)
        patch_sets = {}
        for case_id in training_cases:
            volume = prepare_labeled_volume(*image_and_label(case_id), organs, backbone, feature_cfg, case_id, device=device)
            rng = np.random.default_rng([cfg.seed, needed.index(case_id)])
            origins = sample_patch_origins(volume.classes, base.patch_size_vox, base.patches_per_volume, rng)
            patch_sets[case_id] = cache_patch_features(volume, origins, extractor, base, device)
        timings["cache_features_s"] += time.perf_counter() - started
        say(f"{method}: features of {len(training_cases)} training case(s) cached")
        for split in splits:
            probes = []
            for head, probe_cfg in head_configs.items():
                started = time.perf_counter()
                probes.append(train_head([patch_sets[c] for c in split["train"]], organs, backbone, probe_cfg))
                timings["train_probe_s"] += time.perf_counter() - started
                say(f"{method} / {head} / {split['name']}: probe trained on {len(split['train'])} case(s)")
            for case_id in split["test"]:
                ct, reference = image_and_label(case_id)
                started = time.perf_counter()
                results = segment_with_probes(ct, probes, backbone, largest_component=cfg.largest_component)
                timings["segment_s"] += time.perf_counter() - started
                for head, result in zip(cfg.heads, results):
                    metrics = organ_metrics(sitk.GetArrayViewFromImage(result.labels),
                                            sitk.GetArrayViewFromImage(reference), organs, reference.GetSpacing())  # fmt: skip
                    backbone_rows.append({"method": method, "probe": head, "split": split["name"],
                                          "regime": split["regime"], "case": case_id, "metrics": metrics})  # fmt: skip
                    mean = np.nanmean([m["dice"] for m in metrics.values()])
                    say(f"  {method} / {head} / {case_id}: mean Dice {mean:.3f}")
        del patch_sets
        per_case += backbone_rows
        if reuse_path is not None:
            _save_reusable(reuse_path, backbone, backbone_rows, time.perf_counter() - backbone_started)
    summaries: dict[str, dict] = {}
    rows = []
    for method in backbones:
        for head in cfg.heads:
            for regime in dict.fromkeys(s["regime"] for s in splits):
                subset = [r["metrics"] for r in per_case if (r["method"], r["probe"], r["regime"]) == (method, head, regime)]
                summary = summarise(subset)
                summaries[f"{method}|{head}|{regime}"] = summary
                extra = _backbone_facts(backbones[method])
                rows.append(row_from_summary(method, head, regime, summary, **extra))
    return {"config": asdict(cfg), "probe_config": asdict(base), "splits": splits, "per_case": per_case,
            "summaries": summaries, "rows": rows, "timings": timings, "reused": reused}  # fmt: skip


def _backbone_facts(backbone) -> dict:
    pretrain = getattr(backbone, "pretrain", None)
    if pretrain is None:
        return {}
    return {"pretrain_method": pretrain.method, "use_bpr": pretrain.use_bpr,
            "pretrain_steps": pretrain.training.steps,
            "num_timesteps": pretrain.diffusion.num_timesteps if pretrain.method == "diffusion" else None}  # fmt: skip


def timestep_curves(results: dict) -> dict[tuple[str, str, bool, int], dict[int, dict]]:
    """The timestep ablation's curves: ``{(probe, regime, use_bpr, pretraining steps): {T: summary}}``.

    Only diffusion backbones that differ in nothing but T belong on one curve, so rows are grouped by probe,
    regime, BPR input and pretraining steps; within a group the first backbone of each T is kept.
    """
    curves: dict[tuple[str, str, bool, int], dict[int, dict]] = {}
    for row in results["rows"]:
        if row.get("num_timesteps"):
            key = (row["probe"], row["regime"], bool(row.get("use_bpr")), int(row.get("pretrain_steps") or 0))
            summary = results["summaries"][f"{row['method']}|{row['probe']}|{row['regime']}"]
            curves.setdefault(key, {}).setdefault(int(row["num_timesteps"]), summary)
    return curves


def write_evaluation(results: dict, out_dir: str | Path, title: str = "DiffusionSeg evaluation") -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and plots (the timestep ablation when T varies) to ``out_dir``."""
    from DiffusionSegLib.evaluate.plots import plot_timestep_ablation
    from DiffusionSegLib.evaluate.report import write_report

    out_dir = Path(out_dir)
    notes = [results["notes"]] if results.get("notes") else []
    if results.get("reused"):
        notes.append("Results of " + ", ".join(f"{method} (commit {str(info.get('git_commit'))[:10]})"
                                               for method, info in results["reused"].items())
                     + " were reused from an earlier run with the same weights, cases and settings.")  # fmt: skip
    paths = write_report(dict(results, title=title, notes="\n\n".join(notes)), out_dir)
    for (head, regime, use_bpr, steps), curves in timestep_curves(results).items():
        if len(curves) >= 2:
            inputs = "diffusion + BPR" if use_bpr else "diffusion"
            name = f"timestep_ablation_{head}_{regime.replace(' ', '_')}{'' if use_bpr else '_no_bpr'}.png"
            title = f"Dice vs diffusion timesteps\n{inputs}, {steps} pretraining steps; {head} probe, {regime}"
            paths[name] = plot_timestep_ablation(curves, out_dir / name, title=title)
    return paths
