"""Train a few-shot probe (linear or non-linear head) on a frozen backbone from a few labeled CTs.

Cases come from a dataset folder (``--data``: paired ``<case>_ct`` / ``<case>_labels`` files with a legend, or an
MSD ``dataset.json``) or from explicit ``--case CT LABELS`` pairs. Organs are picked by name with ``--organs
liver,spleen`` (ids from the legend) or as ``--organs liver=6,spleen=1``; ``--labels-legend`` gives the legend for
``--case`` pairs. The probe file records the backbone's hash, the label names and colours, t and the noise seed.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from DiffusionSegLib.preprocess.orientation import add_orientation_argument

log = logging.getLogger(__name__)


def add_case_arguments(parser: argparse.ArgumentParser) -> None:
    """The labeled cases and organs to learn (``--data`` or ``--case``, ``--organs``...; read by
    :func:`labeled_pairs`), shared with ``finetune``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="dataset folder with labeled cases")
    source.add_argument("--case", nargs=2, action="append", metavar=("CT", "LABELS"), help="a CT and its label map "
                        "(repeat for more cases)")  # fmt: skip
    parser.add_argument("--labels-legend", help="legend JSON (id -> organ name) for the label maps")
    parser.add_argument("--label-kind", help="with --data: label files of this kind (e.g. organs)")
    parser.add_argument("--organs", help="organs to learn: 'liver,spleen' (ids from the legend) or 'liver=6,spleen=1'; "
                        "default: every organ of the legend")  # fmt: skip
    parser.add_argument("--max-cases", type=int, default=0, help="with --data: use the first N cases (0: all)")
    add_orientation_argument(parser, "CTs (labeled and unlabeled)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from DiffusionSegLib.commands import options

    options.add_backbone(parser, help="frozen backbone (.safetensors from pretraining; default: the shipped diffusion "
                         "+ BPR backbone, backbone_default)")  # fmt: skip
    add_case_arguments(parser)
    options.add_output(parser, help="probe file to write (.safetensors)")
    parser.add_argument("--head", choices=("linear", "nonlinear", "context"), default=None,
                        help="probe head: linear, nonlinear (1x1x1 decoder) or context (3x3x3 decoder) (default "
                        "nonlinear)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="the quick in-app recipe: context head reading the CT "
                        "and coordinates, 32 channels, up to 600 steps with early stopping (other options override)")  # fmt: skip
    parser.add_argument("--reads-input", action="store_true", help="the head also reads the CT's intensity and BPR "
                        "coordinates next to the frozen features")  # fmt: skip
    parser.add_argument("--hidden", type=int, help="width of the non-linear heads (default 64)")
    parser.add_argument("--patience", type=int, help="stop after this many validations without improvement of "
                        "the held-out loss (default 0: train all --steps)")  # fmt: skip
    parser.add_argument("--lr-drops", type=int, help="on such a plateau, return to the best head and divide the "
                        "learning rate by 10, up to this many times, before stopping (default 0)")  # fmt: skip
    parser.add_argument("--timestep", type=int, default=0, help="diffusion step t of the features (default 0)")
    parser.add_argument("--noise-seed", type=int, default=0, help="seed of the fixed noise field (default 0)")
    parser.add_argument("--draws", type=int, default=1, help="noise draws (ensemble at inference; default 1)")
    parser.add_argument("--steps", type=int, help="training steps (default 300)")
    options.add_patch(parser, help="training patch in working voxels (default 32 64 64)", old=("--patch-size",))
    parser.add_argument("--patches-per-volume", type=int, default=24, help="cached patches per case (default 24)")
    parser.add_argument("--lr", type=float, default=1e-2, help="learning rate (default 1e-2)")
    parser.add_argument("--seed", type=int, default=0, help="sampling / initialisation seed (default 0)")
    options.add_device(parser)
    options.add_precision(parser)
    options.add_bpr(parser)


def _parse_organs(text: str | None) -> list[tuple[str, int | None]] | None:
    from DiffusionSegLib.data.labels import canonical_organ_name
    from DiffusionSegLib.errors import UserInputError

    if not text:
        return None
    organs = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, _, value = item.partition("=")
        if value and not value.strip().isdigit():
            raise UserInputError(f"--organs entry {item!r}: the id after '=' must be a positive integer")
        organs.append((canonical_organ_name(name), int(value) if value else None))
    return organs


def _select(legend, organs):
    """The probe's label list: legend entries named in ``organs`` (or explicit ids), in the given order."""
    from DiffusionSegLib.data.labels import organ_label
    from DiffusionSegLib.errors import UserInputError

    if organs is None:
        if not legend:
            raise UserInputError("no legend to take the organs from; pass --labels-legend or --organs name=id,...")
        return list(legend)
    by_name = {label.name: label for label in legend or []}
    selected = []
    for name, value in organs:
        if value is not None:
            selected.append(organ_label(value, name))
        elif name in by_name:
            selected.append(by_name[name])
        else:
            known = ", ".join(sorted(by_name)) or "none (no legend)"
            raise UserInputError(f"organ '{name}' is not in the legend (known: {known}); use name=id to give its id")
    return selected


def _remap(label_image, case_legend, probe_labels):
    """Rewrite a case's label ids to the probe's ids where its legend numbers the same organs differently."""
    import SimpleITK as sitk

    if not case_legend:
        return label_image
    by_name = {label.name: label.value for label in case_legend}
    moves = {by_name[p.name]: p.value for p in probe_labels if p.name in by_name and by_name[p.name] != p.value}
    if not moves:
        return label_image
    array = sitk.GetArrayFromImage(label_image).astype(np.int32)
    out = np.zeros_like(array)
    keep = {p.value for p in probe_labels} - set(moves.values())
    for value in keep:
        out[array == value] = value
    for old, new in moves.items():
        out[array == old] = new
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(label_image)
    return image


def case_inputs(args: argparse.Namespace, backbone) -> list:
    """The files a training command reads (backbone, BPR, legend, the ``--case`` CTs and label maps): its
    outputs must not be any of them."""
    return [backbone, args.bpr, args.labels_legend, *(path for pair in args.case or () for path in pair)]


def labeled_pairs(args: argparse.Namespace):
    """The labeled cases and organs of ``--data`` / ``--case``, ``--organs``, ``--labels-legend``, read through the
    input gate: ``(cases, organs, names)`` with ``cases`` a list of ``(ct, label map with the organs' ids)``
    images and ``names`` the CT paths (shared with ``finetune``)."""
    from DiffusionSegLib.data.datasets import find_labeled_cases
    from DiffusionSegLib.data.gate import read_ct, read_label_map
    from DiffusionSegLib.data.labels import read_legend
    from DiffusionSegLib.errors import UserInputError
    from DiffusionSegLib.preprocess.orientation import check_orientation

    organs = _parse_organs(args.organs)
    legend = read_legend(args.labels_legend) if args.labels_legend else None
    if args.data:
        found = find_labeled_cases(args.data, args.label_kind)
        if args.max_cases:
            found = found[: args.max_cases]
        if not found:
            raise UserInputError(f"no labeled cases found in {args.data}")
        pairs = [(c.image, c.label, list(c.labels)) for c in found]
        legend = legend or pairs[0][2]
    else:
        pairs = [(ct, labels, legend) for ct, labels in args.case]
    labels = _select(legend, organs)
    cases = []
    for ct_path, seg, case_legend in pairs:
        ct = read_ct(ct_path)
        label_map = read_label_map(seg, ct, case_legend or None)
        ct, label_map, _ = check_orientation(ct, getattr(args, "orientation", "check"), f"'{Path(ct_path).name}'",
                                             label_map)  # fmt: skip
        cases.append((ct, _remap(label_map, case_legend, labels)))
    return cases, labels, [str(ct) for ct, _, _ in pairs]


def run(args: argparse.Namespace) -> int:
    from DiffusionSegLib.commands.interrupt import stop_requests
    from DiffusionSegLib.data.gate import check_output_path
    from DiffusionSegLib.errors import UserInputError
    from DiffusionSegLib.pretrain.export import load_backbone
    from DiffusionSegLib.probe import ProbeConfig, ProbeTrainingCancelled, fit_probe, save_probe
    from DiffusionSegLib.probe.config import QUICK_PROBE

    options = dict(QUICK_PROBE) if args.quick else {"head": "nonlinear", "steps": 300}
    given = {"head": args.head, "steps": args.steps, "hidden_channels": args.hidden, "patience": args.patience,
             "lr_drops": args.lr_drops, "reads_input": args.reads_input or None}  # fmt: skip
    options.update({k: v for k, v in given.items() if v is not None})
    options.update({"timestep": args.timestep, "noise_seed": args.noise_seed, "num_noise_draws": args.draws,
                    "patches_per_volume": args.patches_per_volume, "lr": args.lr, "seed": args.seed,
                    "device": args.device, "precision": args.precision})  # fmt: skip
    if args.patch:
        options["patch_size_vox"] = tuple(args.patch)
    try:
        cfg = ProbeConfig(**options)
    except ValueError as error:
        raise UserInputError(str(error)) from None
    from DiffusionSegLib.resources import default_backbone_path

    backbone_path = args.backbone or default_backbone_path()
    check_output_path(args.output, (".safetensors",), "probe", case_inputs(args, backbone_path))
    backbone = load_backbone(backbone_path)
    cases, labels, _ = labeled_pairs(args)
    log.info("training a %s probe for %s on %d case(s)", cfg.head, ", ".join(l.name for l in labels), len(cases))
    start = time.perf_counter()
    with stop_requests() as should_stop:  # Ctrl-C / SIGTERM: the best head so far is written, marked cancelled
        try:
            probe = fit_probe(cases, labels, backbone, cfg, bpr=args.bpr, should_stop=should_stop)
        except ProbeTrainingCancelled:  # stopped before the first step: there is nothing to write
            raise KeyboardInterrupt from None
    path = save_probe(args.output, probe)
    log.info("wrote %s (best validation loss %.4f at step %d%s, %.0f s)", path, probe.best_val_loss, probe.best_step,
             ", stopped early" if probe.cancelled else "", time.perf_counter() - start)  # fmt: skip
    return 0
