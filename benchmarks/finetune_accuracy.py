"""Accuracy benchmark of fine-tuning on a fixed split of the 20 shared BTCV cases (issue: segmentations worth using).

Split (fixed before any result was seen): the test cases are every fourth case in sorted order, from the fourth
(btcv_0004, 0008, 0022, 0026, 0030); the other 15 train. Regimes: ``full`` (the 15; the last of them, btcv_0029,
held out to choose the checkpoint) and ``fewshot`` (2 of the 15 drawn with ``numpy.random.default_rng(draw)``, no
held-out volume: the end of the cosine schedule is kept). Every run trains at one budget in minutes on this
machine's cores; each test case is segmented with ``segment`` (largest component per organ) and scored on its
**original grid** (Dice per organ, Big / Medium / Small groups). The two 3D-IRCADb scans are an external test
(never trained on; their labeled organs only).

A run is reused when its folder holds a model and a ``key.json`` equal to the run's key (method, backbone hash,
cases, every fine-tuning setting); an interrupted run resumes from its snapshot. Results:
``benchmarks/results/finetune_accuracy/{report.json,report.md}`` and per run ``runs/<name>/`` (the model and its
backbone, ``key.json``, ``train.json`` with the learning curve, ``result.json`` with the scores; the resumable
``snapshot/`` and the weights are not tracked in git: a rerun regenerates them).

    .venv/bin/python benchmarks/finetune_accuracy.py                       # every row at its default budget
    .venv/bin/python benchmarks/finetune_accuracy.py --only pretrained_fewshot_d0 --budget-fewshot 15
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from DiffusionSegLib.data.labels import BTCV_LABELS

DATA = Path(os.environ.get("DIFFUSIONSEG_DATA", REPO.parent / "shared" / "data"))

log = logging.getLogger("finetune_accuracy")
OUT = REPO / "benchmarks" / "results" / "finetune_accuracy"
REGISTRATIONS = OUT / "registrations"
"""Registrations shared by the cohort rows and the registration anchor (derived from the BTCV images: never
committed); each keeps the seconds it took, which count in the budget of every row that uses it."""
METHODS = {  # row name: (what it is, FinetuneConfig fields)
    "pretrained": ("fine-tuned from diffusion + BPR pretraining", {"init": "pretrained"}),
    "pretrained_nocoords": ("fine-tuned from diffusion + BPR pretraining, coordinates off",
                            {"init": "pretrained", "use_coordinates": False}),
    "pretrained_ema": ("fine-tuned from diffusion + BPR pretraining, weights averaged (EMA 0.995)",
                       {"init": "pretrained", "ema_decay": 0.995}),
    "pretrained_ema_slow_backbone": (
        "fine-tuned from diffusion + BPR pretraining, EMA 0.995, backbone at 0.1x the head's learning rate",
        {"init": "pretrained", "ema_decay": 0.995, "backbone_lr_scale": 0.1}),
    "pretrained_grid15": (
        "fine-tuned from diffusion + BPR pretraining on the pretraining grid (1.5 x 1.5 x 3 mm, 32 x 96 x 96 patches)",
        {"init": "pretrained", "spacing_mm": (1.5, 1.5, 3.0), "patch_size_vox": (32, 96, 96)}),
    "cohort": (("fine-tuned from diffusion + BPR pretraining, plus the 13 other pool scans unlabeled (labels "
                "propagated by BPR-started ANTs SyN, kept where the labeled scans agree)"),
               {"init": "pretrained", "pseudo_background_margin_mm": 0.0}),
    "cohort_self": (("fine-tuned from diffusion + BPR pretraining, plus the 13 other pool scans unlabeled "
                     "(self-training: labeled scans alone for half the run, then the network's own labels of "
                     "probability >= 0.9)"),
                    {"init": "pretrained", "pseudo_labels": "self-training", "pseudo_background_margin_mm": 0.0}),
    "cohort_margin": (("fine-tuned from diffusion + BPR pretraining, plus the 13 other pool scans unlabeled "
                       "(registration as in cohort; background pseudo-labels within 12 mm of a propagated organ or a "
                       "disagreement left out of the loss)"), {"init": "pretrained", "pseudo_background_margin_mm": 12.0}),
    "cohort_margin_self": (("fine-tuned from diffusion + BPR pretraining, plus the 13 other pool scans unlabeled "
                            "(registration labels with the 12 mm margin for half the run, then the network's own "
                            "labels of probability >= 0.9, same margin)"),
                           {"init": "pretrained", "pseudo_background_margin_mm": 12.0,
                            "pseudo_labels": "registration+self-training"}),
    "cohort_self_margin": (("fine-tuned from diffusion + BPR pretraining, plus the 13 other pool scans unlabeled "
                            "(no registration: labeled scans alone for half the run, then the network's own labels "
                            "of probability >= 0.9, background within 12 mm of them or of an unsure voxel left out)"),
                           {"init": "pretrained", "pseudo_labels": "self-training",
                            "pseudo_background_margin_mm": 12.0}),
    "cohort_margin_transductive": (("fine-tuned from diffusion + BPR pretraining, plus the 5 test scans unlabeled "
                                    "(the user's protocol: the scans to segment are the cohort; their labels are "
                                    "never read; registration and 12 mm margin as in cohort_margin)"),
                                   {"init": "pretrained", "pseudo_background_margin_mm": 12.0}),
    "cohort_vote_transductive": (("as cohort_margin_transductive, the registrations fused by locally weighted vote "
                                  "(an atlas without an organ abstains where another places it)"),
                                 {"init": "pretrained", "pseudo_background_margin_mm": 12.0,
                                  "pseudo_fusion": "weighted-vote"}),
    "random": ("our network, random init, fine-tuned", {"init": "random"}),
    "monai_unet": ("MONAI UNet from scratch (DESIGN.md §2 recipe)", None),
    "frozen_context": ("frozen probe (context head + CT and coordinates) on the diffusion + BPR backbone", None),
    "frozen_context_random": ("frozen probe (context head + CT and coordinates) on a random-init backbone", None),
}
FROZEN = {"frozen_context": "pretrained", "frozen_context_random": "random"}
"""Frozen-probe rows (the quick in-app path): the backbone is not trained; the head stops when its held-out loss
has not improved for ``patience`` validations (``probe_config``), so these rows have no minute budget."""
"""``monai_unet`` is what a user does without us (``benchmarks/monai_unet_baseline.py``), trained at the same
budget on the same cases and scored the same way (no largest-component clean-up: a plain MONAI user has none)."""
COHORT = {m for m in METHODS if m.startswith("cohort")}
"""Rows that also learn from the unlabeled cohort: the pool's other 13 scans, read as CT only (their labels are
never opened); few-shot regimes only."""
TRANSDUCTIVE = {m for m in COHORT if m.endswith("_transductive")}
"""Cohort rows whose unlabeled cohort is the 5 test scans instead (what a user does: the scans to segment are the
unlabeled scans given to ``finetune``), read as CT only."""
DRAWS = (0, 1, 2, 3)
"""Few-shot draws: ``numpy.random.default_rng(draw)`` picks 2 of the 15 pool cases (d0: 0023 + 0025, the only
unenhanced scans, the hard case; d1: 0009 + 0010; d2: 0005 + 0025; d3: 0002 + 0025)."""
ONE_SCAN_DRAWS = (0, 1)
"""1-scan rows (``oneshot``): the first scan of draws d0 and d1 (btcv_0023, btcv_0009)."""
BUDGETS = {"full": 40.0, "fewshot": 15.0, "cohort": 30.0}
"""Default minutes per run of each regime (the issue's: a from-scratch U-Net's 40 minutes; 15 from 2 scans; 30
for 2 scans and their unlabeled cohort, registration included)."""


def starts_from_pretraining(method: str) -> bool:
    """Whether the row's network starts from our pretrained backbone (not random init, not the MONAI U-Net)."""
    init = FROZEN.get(method) or (METHODS[method][1] or {}).get("init")
    return init == "pretrained"


def split(case_ids: list[str]) -> tuple[list[str], list[str]]:
    """(training, test) case ids: every fourth sorted case from the fourth is a test case."""
    ordered = sorted(case_ids)
    test = ordered[3::4]
    return [c for c in ordered if c not in test], test


def run_cases(regime: str, draw: int, training: list[str]) -> list[str]:
    if regime == "full":
        return list(training)
    chosen = np.random.default_rng(draw).choice(len(training), 2, replace=False)
    cases = [training[i] for i in sorted(chosen)]
    return cases[:1] if regime == "oneshot" else cases


def cohort_cases(row: dict, training: list[str], test: list[str] = ()) -> list[str]:
    """The unlabeled cohort of a row: the pool cases it was not given labels of, or for a transductive row the
    ``test`` cases (none for other methods)."""
    if row["method"] not in COHORT:
        return []
    if row["method"] in TRANSDUCTIVE:
        return list(test)
    used = run_cases(row["regime"], row["draw"], training)
    return [c for c in training if c not in used]


def runs(args) -> list[dict]:
    """Every row of the table: name, method, regime, draw, budget."""
    tag = f"_{args.tag}" if args.tag else ""
    rows = [{"name": f"{m}_full{tag}", "method": m, "regime": "full", "draw": 0, "budget": args.budget_full}
            for m in METHODS if m not in COHORT]  # fmt: skip
    rows += [{"name": f"{m}_fewshot_d{d}{tag}", "method": m, "regime": "fewshot", "draw": d,
              "budget": args.budget_cohort if m in COHORT else args.budget_fewshot}
             for m in METHODS for d in DRAWS]  # fmt: skip
    rows += [{"name": f"{m}_oneshot_d{d}{tag}", "method": m, "regime": "oneshot", "draw": d,
              "budget": args.budget_cohort if m in COHORT else args.budget_fewshot}
             for m in METHODS for d in ONE_SCAN_DRAWS]  # fmt: skip
    if args.steps:  # a step count instead of the minute budget (independent of the machine's load)
        rows = [dict(r, steps=args.steps, name=f"{r['name']}_{args.steps}steps") for r in rows]
    return [r for r in rows if not args.only or r["name"] in args.only]


def finetune_config(row: dict, device: str):
    """The fine-tuning settings of a row (its method's fields at the row's budget or steps and seed)."""
    from DiffusionSegLib.finetune import FinetuneConfig

    budget = {"budget_minutes": 0.0, "steps": row["steps"]} if row.get("steps") else {"budget_minutes": row["budget"]}
    return FinetuneConfig(**METHODS[row["method"]][1], **budget, seed=row["draw"],
                          val_volumes=1 if row["regime"] == "full" else 0, device=device)  # fmt: skip


def _key(row: dict, cases: list[str], backbone, cfg, unlabeled: list[str]) -> dict:
    """A run's reuse key; the settings as trained (a margin does nothing without unlabeled scans: recorded as 0,
    as the rows recorded before the 12 mm default are)."""
    key = {"method": row["method"], "backbone_sha256": backbone.sha256, "cases": cases,
           "finetune": cfg.as_trained(bool(unlabeled)).to_dict(), "organs": [o.name for o in BTCV_LABELS]}  # fmt: skip
    if unlabeled:  # added after runs were recorded: absent when empty so their keys still match
        key["unlabeled"] = unlabeled
    return key


def read_unlabeled(cases_by_id: dict, case_ids: list[str]) -> list:
    """The CT images of ``case_ids``: a cohort row's unlabeled scans (their label files are never opened)."""
    from DiffusionSegLib.data.volume import read_volume

    return [read_volume(cases_by_id[c].image) for c in case_ids]


def _baseline_key(row: dict, cases: list[str]) -> dict:
    from DiffusionSegLib.checkpoint import file_sha256

    return {"method": row["method"], "recipe_sha256": file_sha256(REPO / "benchmarks" / "monai_unet_baseline.py"),
            "cases": cases, "budget_minutes": row["budget"], "seed": row["draw"], "organs": [o.name for o in BTCV_LABELS]}  # fmt: skip


def probe_config(row: dict, device: str):
    """Few-shot rows: the quick in-app probe (``QUICK_PROBE``); the 15-case row: the same head 64 wide, with up to
    3000 steps (15 cases give 360 cached patches) and two tenfold learning-rate drops at plateaus of the held-out
    loss (it was still falling when the first plateau stopped the constant rate); both stopped by their held-out
    loss."""
    from DiffusionSegLib.probe import ProbeConfig
    from DiffusionSegLib.probe.config import QUICK_PROBE

    options = dict(QUICK_PROBE)
    if row["regime"] == "full":
        options.update(hidden_channels=64, steps=3000, lr_drops=2)
    return ProbeConfig(**options, seed=row["draw"], device=device, val_volumes=1 if row["regime"] == "full" else 0)


def random_backbone(backbone, folder: Path, seed: int = 0):
    """The backbone's architecture, inputs and working grid with freshly initialised weights (written to
    ``folder``): what the frozen probe reads without pretraining."""
    import torch

    from DiffusionSegLib.nets import UNet3d
    from DiffusionSegLib.pretrain.export import export_backbone, load_backbone

    torch.manual_seed(seed)
    model = UNet3d.from_config(backbone.model.config).eval()
    path = export_backbone(folder / "random_backbone.safetensors", backbone.pretrain, model, steps=0, bpr_path=None,
                           bpr_sha256=backbone.bpr_sha256, val_loss=None,
                           extra={"random_init": True, "seed": seed, "architecture_of": backbone.sha256})  # fmt: skip
    return load_backbone(path)


def shown_organs(pairs) -> list:
    """The BTCV organs that the training label maps show, as a user's legend would list them (btcv_0023, d0's
    first scan, has no gallbladder: a 1-scan row cannot learn it)."""
    import SimpleITK as sitk

    present = set()
    for _, labels in pairs:
        present |= {int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels))}
    return [o for o in BTCV_LABELS if o.value in present]


def train(row: dict, cases_by_id: dict, training: list[str], backbone, args) -> tuple[Path, dict]:
    from DiffusionSegLib.data.volume import read_volume
    from DiffusionSegLib.finetune import finetune

    cases = run_cases(row["regime"], row["draw"], training)
    unlabeled = cohort_cases(row, training, split(list(cases_by_id))[1])
    folder = OUT / "runs" / row["name"]
    if row["method"] == "monai_unet":
        model, key = folder / "model.pt", _baseline_key(row, cases)
    elif row["method"] in FROZEN:
        model = folder / "model.safetensors"
        key = {"method": row["method"], "backbone_sha256": backbone.sha256, "cases": cases,
               "probe": probe_config(row, args.device).to_dict(), "organs": [o.name for o in BTCV_LABELS]}  # fmt: skip
    else:
        cfg = finetune_config(row, args.device)
        model, key = folder / "model.safetensors", _key(row, cases, backbone, cfg, unlabeled)
    key_file = folder / "key.json"
    if model.is_file() and key_file.is_file() and json.loads(key_file.read_text()) == key:
        log.info("%s: reusing %s", row["name"], model)
        info = json.loads((folder / "train.json").read_text())
        info.setdefault("backbone_steps", backbone_steps(backbone))  # runs from before it was recorded
        info.setdefault("backbone_timesteps", backbone_timesteps(backbone.path))
        return model, info
    if key_file.is_file() and json.loads(key_file.read_text()) != key:  # other settings: start that row over
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key_file.write_text(json.dumps(key, indent=1))
    pairs = [(read_volume(cases_by_id[c].image), read_volume(cases_by_id[c].label)) for c in cases]
    started = time.perf_counter()
    if row["method"] == "monai_unet":
        from monai_unet_baseline import train_unet

        # the full regime keeps the best validation on its last case, as fine-tuning does
        held_out = pairs[-1] if row["regime"] == "full" else None
        info = train_unet(pairs[:-1] if held_out else pairs, [o.value for o in BTCV_LABELS], row["budget"],
                          row["draw"], model, held_out, "cuda" if args.device == "cuda" else "cpu")  # fmt: skip
        info.update(cases=cases, wall_s=time.perf_counter() - started, cancelled=False)
    elif row["method"] in FROZEN:
        from DiffusionSegLib.probe import fit_probe, save_probe

        reads = backbone if FROZEN[row["method"]] == "pretrained" else random_backbone(backbone, folder)
        probe = fit_probe(pairs, BTCV_LABELS, reads, probe_config(row, args.device), progress=not args.quiet)
        save_probe(model, probe)
        wall = time.perf_counter() - started
        info = {"cases": cases, "steps": probe.history[-1]["step"], "best_step": probe.best_step,
                "history": probe.history, "seconds": {"train": wall}, "wall_s": wall, "cancelled": False}  # fmt: skip
    else:
        labels = shown_organs(pairs)
        if len(labels) < len(BTCV_LABELS):
            log.info("%s: %s not in the training scans: not learned (scored as Dice 0)", row["name"],
                     ", ".join(o.name for o in BTCV_LABELS if o not in labels))  # fmt: skip
        result = finetune(pairs, labels, backbone, model, cfg, run_dir=folder / "snapshot", case_names=cases,
                          progress=not args.quiet, unlabeled=read_unlabeled(cases_by_id, unlabeled),
                          unlabeled_names=unlabeled, registration_cache=REGISTRATIONS)  # fmt: skip
        info = {"cases": cases, "unlabeled": unlabeled, "steps": result.steps, "planned_steps": result.planned_steps,
                "best_step": result.best_step, "history": result.history, "seconds": result.seconds,
                "wall_s": time.perf_counter() - started, "cancelled": result.cancelled}  # fmt: skip
    info["backbone_steps"] = backbone_steps(backbone)
    info["backbone_timesteps"] = backbone_timesteps(backbone.path)
    info["machine"] = machine_record(args.device)
    (folder / "train.json").write_text(json.dumps(info, indent=1))
    return model, info


def machine_label(row: dict) -> str:
    """`` [float32 CPU]`` for rows trained on a CPU without AMX (rows without a machine record ran with AMX)."""
    machine = row.get("machine") or {}
    return " [float32 CPU]" if machine.get("device") == "cpu" and machine.get("forward") == "float32" else ""


def machine_record(device: str) -> dict:
    """What a minute budget bought on the machine that trained a row: ``backbone_throughput.machine_info`` (CPU,
    threads, torch, git commit, date) with the device and the forward pass's precision (bfloat16 only where the CPU
    has AMX units, about 1.7x the float32 steps per minute)."""
    from backbone_throughput import machine_info

    from DiffusionSegLib.features import resolve_device
    from DiffusionSegLib.features.extractor import autocast_dtype

    compute = resolve_device(device)
    dtype = autocast_dtype("auto", compute)
    return machine_info(compute) | {"device": str(compute),
                                    "forward": str(dtype).removeprefix("torch.") if dtype else "float32"}  # fmt: skip


def backbone_steps(backbone) -> int | None:
    """Pretraining steps recorded in a backbone file (from its header; the weights are already loaded)."""
    from DiffusionSegLib.checkpoint import read_weights_header

    return read_weights_header(backbone.path, kind="backbone")[1].get("extra", {}).get("steps")


def backbone_timesteps(path) -> int | None:
    """The diffusion T a backbone file was pretrained with (None for the other methods), from its header."""
    from DiffusionSegLib.checkpoint import read_weights_header

    pretrain = (read_weights_header(path, kind="backbone")[0] or {}).get("pretrain", {})
    return pretrain.get("diffusion", {}).get("num_timesteps") if pretrain.get("method") == "diffusion" else None


def pretraining_label(row: dict) -> str:
    """`` (N pretraining steps)`` for rows that start from pretraining, with ``, T t`` when the backbone's diffusion
    T is not the shipped default backbone's (rows from the timestep ablation's backbones)."""
    if not (row.get("backbone_steps") and starts_from_pretraining(row["method"])):
        return ""
    timesteps = row.get("backbone_timesteps")
    shown_t = f", T {timesteps}" if timesteps not in (None, default_timesteps()) else ""
    return f" ({row['backbone_steps']} pretraining steps{shown_t})"


@functools.cache
def default_timesteps() -> int | None:
    """The shipped default backbone's diffusion T."""
    return backbone_timesteps(REPO / "Resources" / "Models" / "backbone_default.safetensors")


def _segmenter(model: Path):
    """``image -> label map on its grid`` for a run's model file, segmented as ``diffusionseg segment`` does
    (:data:`DiffusionSegLib.defaults.SEGMENT_OPTIONS`)."""
    if model.suffix == ".pt":
        from monai_unet_baseline import UNetSegmenter

        return UNetSegmenter(model)
    from DiffusionSegLib.defaults import SEGMENT_OPTIONS
    from DiffusionSegLib.pretrain.export import load_backbone
    from DiffusionSegLib.probe import find_probe_backbone, load_probe, segment

    backbone = load_backbone(find_probe_backbone(model))
    probe = load_probe(model, backbone)
    return lambda image: segment(image, probe, backbone, **SEGMENT_OPTIONS).labels


def evaluate(model: Path, test_cases: list, external: list) -> dict:
    import SimpleITK as sitk

    from DiffusionSegLib.data.volume import read_volume
    from DiffusionSegLib.evaluate.metrics import organ_metrics, size_group_means

    segment = _segmenter(model)
    out = {"test": {}, "external": {}}
    for where, cases in (("test", test_cases), ("external", external)):
        for case_id, image_path, label_path, organs in cases:
            image, reference = read_volume(image_path), read_volume(label_path)
            started = time.perf_counter()
            labels = segment(image)
            seconds = time.perf_counter() - started
            scores = organ_metrics(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(reference), organs,
                                   image.GetSpacing())  # fmt: skip
            dice = {name: s["dice"] for name, s in scores.items() if where == "test" or s["present_in_reference"]}
            out[where][case_id] = {"dice": dice, "groups": size_group_means(dice), "segment_s": seconds}
            log.info("%s %s: mean Dice %.3f (%.1f s)", model.parent.name, case_id, out[where][case_id]["groups"]["mean"],
                     seconds)  # fmt: skip
    return out


def _external_cases() -> list:
    from DiffusionSegLib.data.labels import read_legend

    root = DATA / "labeled"
    cases = []
    for case in ("ircadb1.01", "ircadb1.17"):
        image, labels = root / f"{case}_ct.nii.gz", root / f"{case}_organs.nii.gz"
        if not image.is_file():
            continue
        legend = {o.name: o for o in read_legend(root / f"{case}_legend.json", "organs")}
        organs = [o for o in BTCV_LABELS if o.name in legend and legend[o.name].value == o.value]
        cases.append((case, image, labels, organs))
    return cases


def summarise(row: dict, info: dict, scores: dict) -> dict:
    test = scores["test"]
    organs = [o.name for o in BTCV_LABELS]
    per_organ = {o: float(np.nanmean([c["dice"].get(o, np.nan) for c in test.values()])) for o in organs}
    groups = {g: float(np.nanmean([c["groups"][g] for c in test.values()])) for g in ("big", "medium", "small", "mean")}
    spread = float(np.std([c["groups"]["mean"] for c in test.values()]))
    external = {case: c["dice"] for case, c in scores["external"].items()}
    return dict(row, backbone_steps=info.get("backbone_steps"), backbone_timesteps=info.get("backbone_timesteps"),
                machine=info.get("machine"), cases=info["cases"], steps=info["steps"], train_minutes=info["seconds"]["train"] / 60,
                wall_minutes=info["wall_s"] / 60, per_organ=per_organ, groups=groups, mean_spread=spread,
                external=external, segment_s=float(np.mean([c["segment_s"] for c in test.values()])))  # fmt: skip


def fewshot_summary(rows: list[dict]) -> list[str]:
    """Lines of the few-shot table: per method (and tag), the test mean of each draw, their mean and the worst."""
    import re

    groups: dict[str, dict[int, float]] = {}
    for r in rows:
        if r["regime"] != "fewshot":
            continue
        groups.setdefault(re.sub(rf"_d{r['draw']}(?=_|$)", "", r["name"]), {})[r["draw"]] = r["groups"]["mean"]
    if not groups:
        return []
    lines = ["", "Few-shot draws (mean Dice over 13 organs on the 5 test cases):", "",
             "| rows | " + " | ".join(f"d{d}" for d in DRAWS) + " | mean of the draws | worst |",
             "|---|" + "---:|" * (len(DRAWS) + 2)]  # fmt: skip
    for name, by_draw in sorted(groups.items()):
        cells = [f"{by_draw[d]:.3f}" if d in by_draw else "–" for d in DRAWS]
        values = list(by_draw.values())
        complete = len(by_draw) == len(DRAWS)
        mean = f"{np.mean(values):.3f}" + ("" if complete else f" ({len(values)} draws)")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean} | {min(values):.3f} |")
    return lines


def write_report(rows: list[dict]) -> None:
    (OUT / "report.json").write_text(json.dumps(rows, indent=1))
    short = {"spleen": "spl", "right kidney": "rkid", "left kidney": "lkid", "liver": "liv", "aorta": "aor",
             "pancreas": "pan", "stomach": "sto"}  # fmt: skip
    lines = ["# Fine-tuning accuracy, fixed BTCV split (5 test cases on their original grid)", "",
             "Command: `.venv/bin/python benchmarks/finetune_accuracy.py` (see its docstring for the split).", "",
             ("Budgets are wall-clock minutes on 2 CPU cores. Rows marked [float32 CPU] trained on a CPU without AMX "
              "units (float32 forward pass, about a third of the steps per minute); the others on one with AMX "
              "(bfloat16 forward pass)."), "",
             "| model | regime | cases | budget (min) | wall (min) | steps | Big | Medium | Small | Mean ± sd (13) | "
             + " | ".join(short.values()) + " |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(short)]  # fmt: skip
    for r in rows:
        g = r["groups"]
        organs = " | ".join(f"{r['per_organ'][o]:.3f}" for o in short)
        budget = "–" if r["method"] in FROZEN else f"{r['budget']:g}"
        what = METHODS[r["method"]][0] + pretraining_label(r) + machine_label(r)
        lines.append(f"| {what} | {r['regime']} | {', '.join(c[-4:] for c in r['cases'])} | "
                     f"{budget} | {r['wall_minutes']:.1f} | {r['steps']} | {g['big']:.3f} | {g['medium']:.3f} | "
                     f"{g['small']:.3f} | "
                     f"{g['mean']:.3f} ± {r['mean_spread']:.3f} | {organs} |")  # fmt: skip
    lines += fewshot_summary(rows)
    lines += ["", "External test (3D-IRCADb, never trained on), Dice per labeled organ:", ""]
    for r in rows:
        parts = [f"{case}: " + ", ".join(f"{o} {d:.3f}" for o, d in dice.items()) for case, dice in r["external"].items()]
        lines.append(f"* {r['name']}: " + "; ".join(parts))
    (OUT / "report.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="run only these rows (names as in the report)")
    parser.add_argument("--budget-full", type=float, default=BUDGETS["full"],
                        help=f"minutes per full-regime run (default {BUDGETS['full']:g})")  # fmt: skip
    parser.add_argument("--budget-fewshot", type=float, default=BUDGETS["fewshot"],
                        help=f"minutes per 2-case run (default {BUDGETS['fewshot']:g})")  # fmt: skip
    parser.add_argument("--budget-cohort", type=float, default=BUDGETS["cohort"],
                        help=f"minutes per cohort run, registration included (default {BUDGETS['cohort']:g})")
    parser.add_argument("--steps", type=int, default=0, help="train this many steps instead of the minute budget "
                        "(rows named *_<N>steps; registration is timed and recorded as it ran)")  # fmt: skip
    parser.add_argument("--backbone", default=str(REPO / "Resources" / "Models" / "backbone_default.safetensors"))
    parser.add_argument("--tag", default="", help="suffix of the row names (and run folders), e.g. the backbone's "
                        "pretraining length when --backbone is not the default")  # fmt: skip
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--train-only", action="store_true", help="train (or reuse) the runs, skip evaluation")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from DiffusionSegLib.checkpoint import file_sha256
    from DiffusionSegLib.data.datasets import find_labeled_cases
    from DiffusionSegLib.pretrain.export import load_backbone

    found = {c.case_id: c for c in find_labeled_cases(DATA / "btcv")}
    training, test = split(list(found))
    backbone = load_backbone(args.backbone)
    test_cases = [(c, found[c].image, found[c].label, BTCV_LABELS) for c in test]
    external = _external_cases()
    previous = {r["name"]: r for r in json.loads((OUT / "report.json").read_text())} if (OUT / "report.json").is_file() else {}
    for row in runs(args):
        model, info = train(row, found, training, backbone, args)
        if args.train_only:
            continue
        result_file = model.parent / "result.json"
        digest = file_sha256(model)
        if result_file.is_file() and json.loads(result_file.read_text()).get("model_sha256") == digest:
            scores = json.loads(result_file.read_text())["scores"]
        else:
            scores = evaluate(model, test_cases, external)
            result_file.write_text(json.dumps({"model_sha256": digest, "scores": scores}, indent=1))
        previous[row["name"]] = summarise(row, info, scores)
        write_report(list(previous.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
