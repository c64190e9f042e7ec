"""What the damaged-file checks cost: ``read_ct`` on an intact 512 x 512 x 129 CT against the ``read_ct`` before them.

    .venv/bin/python benchmarks/read_check_cost.py                   # 9 rounds, the 3D-IRCADb full-size CT
    .venv/bin/python benchmarks/read_check_cost.py --rounds 15 --input ct.nii.gz

Before: the input gate of commit ``--baseline`` (the last one without the checks), loaded from git into this
process: ITK decompresses the ``.nii.gz`` and reads it, then the CT checks. Now: the stream is decompressed once
by the gate (ISA-L), its CRC and length checked, and the voxels taken from those bytes (ITK reads the header);
the same CT checks, plus the extent check. Also timed: now with the standard library's zlib in place of ISA-L
(what a machine without ``isal`` gets). The three reads alternate in each round, so a busy shared CPU slows
them alike; the medians and their ratio to "before" are reported, and each read is checked to give the same
image. Results: ``benchmarks/results/read_check_cost.{json,md}``.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA = Path(os.environ.get("DIFFUSIONSEG_DATA", REPO.parent / "shared" / "data"))
SOURCE = DATA / "raw" / "ircadb1.01_ct_fullres.nii.gz"
BASELINE = "2ef9fa4"  # the input gate before the damaged-file checks (issue #32)
OUT = REPO / "benchmarks" / "results"


def baseline_read_ct(commit: str):
    """``read_ct`` as it was at ``commit``: its ``volume.py`` and ``gate.py`` loaded from git as modules."""
    modules = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in ("volume", "gate"):
            source = subprocess.run(["git", "show", f"{commit}:DiffusionSegLib/data/{name}.py"], cwd=REPO, check=True,
                                    capture_output=True, text=True).stdout  # fmt: skip
            if name == "gate":  # the old gate imports the old volume module
                source = source.replace("from DiffusionSegLib.data.volume import", "from baseline_volume import")
            path = Path(folder) / f"baseline_{name}.py"
            path.write_text(source)
            spec = importlib.util.spec_from_file_location(f"baseline_{name}", path)
            modules[name] = importlib.util.module_from_spec(spec)
            sys.modules[f"baseline_{name}"] = modules[name]
            spec.loader.exec_module(modules[name])
    return modules["gate"].read_ct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=SOURCE, help="an intact .nii.gz CT (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=9, help="rounds of the three reads (default 9)")
    parser.add_argument("--baseline", default=BASELINE, help="commit of the read_ct to compare with")
    args = parser.parse_args()

    import numpy as np
    import SimpleITK as sitk

    from DiffusionSegLib.data import integrity
    from DiffusionSegLib.data.gate import read_ct

    fast = integrity._gzip
    old_read_ct = baseline_read_ct(args.baseline)

    def now_stdlib(path):
        integrity._gzip = gzip
        try:
            return read_ct(path)
        finally:
            integrity._gzip = fast

    reads = {"before": old_read_ct, "now": read_ct, "now, stdlib zlib": now_stdlib}
    reference = sitk.GetArrayFromImage(old_read_ct(args.input))
    for name, read in reads.items():  # warm the page cache and check that all three give the same image
        image = read(args.input)
        assert np.array_equal(sitk.GetArrayViewFromImage(image), reference), name
    seconds: dict[str, list[float]] = {name: [] for name in reads}
    for _ in range(args.rounds):
        for name, read in reads.items():
            start = time.perf_counter()
            read(args.input)
            seconds[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    result = {"input": args.input.name, "size": list(image.GetSize()), "rounds": args.rounds,
              "baseline_commit": args.baseline, "isal": fast is not gzip,
              "median_s": {k: round(v, 4) for k, v in medians.items()},
              "ratio_to_before": {k: round(v / medians["before"], 3) for k, v in medians.items()},
              "all_s": {k: [round(v, 4) for v in values] for k, values in seconds.items()},
              "cpu_count": os.cpu_count(), "load_average": [round(v, 2) for v in os.getloadavg()],
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "read_check_cost.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = [f"| {name} | {medians[name]:.3f} | {medians[name] / medians['before']:.2f} |" for name in reads]
    (OUT / "read_check_cost.md").write_text(
        f"# read_ct on {args.input.name} ({' x '.join(map(str, result['size']))}), median of {args.rounds} rounds\n\n"
        f"| read | median s | ratio to before |\n|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"Before: commit {args.baseline}. Load average {result['load_average']} on {os.cpu_count()} CPUs "
        f"({result['date']}).\n"
    )
    print(json.dumps({k: result[k] for k in ("median_s", "ratio_to_before", "load_average")}))


if __name__ == "__main__":
    main()
