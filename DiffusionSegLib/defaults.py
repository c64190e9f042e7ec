"""The product's defaults, in one place: what ``diffusionseg``, the Slicer module, its job script and the
benchmarks use when nothing else is asked for. Each is the measured best (or, where two settings measured the
same, the one every published figure used).

This module imports nothing heavy (no torch), so the command line's ``--help`` and the Slicer GUI can read it.
"""

from __future__ import annotations

__all__ = ["LARGEST_COMPONENT", "PSEUDO_BACKGROUND_MARGIN_MM", "COHORT_FUSION_WEIGHT", "SEGMENT_OPTIONS", "DEVICES",
           "PRECISIONS"]

LARGEST_COMPONENT = True
"""``segment`` keeps each organ's largest connected component. Measured: on 5 BTCV test scans with their model,
mean Dice 0.703 with it and 0.702 without; on 10 unseen scans, 13-organ mean 0.762 with it and 0.766 without (no
difference either way); every accuracy figure and the demo use it, so ``segment``, Slicer's Segment, ``evaluate``
and the accuracy benchmark do too (``--no-largest-component`` turns it off)."""

PSEUDO_BACKGROUND_MARGIN_MM = 12.0
"""``finetune`` with unlabeled scans: background pseudo-labels nearer than this to a pseudo-labeled organ or an
unsure voxel are left out of the loss. 12 mm is the only cohort setting that gained over learning from the
labeled scans alone (0 mm, every background pseudo-label counting, lost). Without unlabeled scans it does
nothing."""

COHORT_FUSION_WEIGHT = 0.6
"""``segment`` of a scan in the model's training cohort (``finetune --unlabeled``): the network's weight ``w`` in
``w · p_network + (1 − w) · p_registration`` (:mod:`DiffusionSegLib.cohort.fusion`). Chosen on training data only
(``benchmarks/cohort_fusion.py``: the pool-cohort models of few-shot draws d0 and d1 on 6 of their cohort's pool
scans each, scored against those scans' manual labels on the working grid): 13-organ mean Dice 0.389 at w = 0.6,
0.389 at 0.8, 0.388 for the network alone (w = 1), 0.367 at 0.5 and 0.312 for the registrations alone (w = 0);
per draw the best w was 0.6 (d0, +0.008 over the network) and 1.0 (d1, 0.007 above 0.6). Above 0.5 the network
decides wherever it is confident, so the registrations only settle the voxels it is unsure of."""

SEGMENT_OPTIONS = {"largest_component": LARGEST_COMPONENT}
"""Keyword arguments every product path passes to :func:`DiffusionSegLib.probe.segment` (the command line, the
demo, the Slicer job, ``evaluate`` and the accuracy benchmark), so their labels are the same."""

DEVICES = ("auto", "cpu", "cuda")
"""Where a network runs (``auto``: a CUDA GPU if present, else the CPU)."""

PRECISIONS = ("auto", "float32", "bfloat16")
"""Network arithmetic (``auto``: see :mod:`DiffusionSegLib.precision`); the same tuple as
:data:`DiffusionSegLib.precision.PRECISIONS`, here without importing torch."""
