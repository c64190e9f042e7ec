"""The accuracy benchmark's stored runs stay reusable across the 12 mm margin default: every committed
``key.json`` of a fine-tuning row equals the key the benchmark builds today for the same row."""

from __future__ import annotations

import json
import sys

from helpers import REPO


def test_stored_reuse_keys_match_the_keys_built_today():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import finetune_accuracy as bench

    matched, margins = [], {}
    for key_file in sorted((bench.OUT / "runs").glob("*/key.json")):
        stored = json.loads(key_file.read_text())
        method, recorded = stored["method"], stored.get("finetune")
        if recorded is None or bench.METHODS.get(method, (None, None))[1] is None:
            continue  # the MONAI baseline and the frozen probes have other keys
        row = {"method": method, "regime": "full" if recorded["val_volumes"] else "fewshot", "draw": recorded["seed"],
               "budget": recorded["budget_minutes"], "steps": 0 if recorded["budget_minutes"] else recorded["steps"]}

        class Backbone:
            sha256 = stored["backbone_sha256"]

        key = bench._key(row, stored["cases"], Backbone, bench.finetune_config(row, recorded["device"]),
                         stored.get("unlabeled", []))  # fmt: skip
        margin = recorded.get("pseudo_background_margin_mm")
        assert key["finetune"].get("pseudo_background_margin_mm") == margin, key_file  # never the margin differs
        margins[key_file.parent.name] = margin
        if key == stored:
            matched.append(key_file.parent.name)
    explicit_12 = [name for name, margin in margins.items() if margin == 12.0]
    assert explicit_12 and set(explicit_12) <= set(matched)  # the 12 mm rows: stored keys still match
    assert any(name.startswith("cohort_fewshot") for name in matched)  # 0 mm cohort rows too
    assert any(name.startswith("pretrained_fewshot") for name in matched)  # labeled-only rows (margin inert)
    assert len(matched) >= len(margins) - 1  # one run of an older augmentation recipe is stale anyway
