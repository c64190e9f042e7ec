import subprocess
import sys

import DiffusionSegLib


def test_every_public_name_resolves():
    for name in DiffusionSegLib.__all__:
        assert getattr(DiffusionSegLib, name) is not None, name


def test_importing_the_library_does_not_load_torch():
    """Slicer imports the library at start-up: heavy packages load only when a stage is used."""
    code = "import sys, DiffusionSegLib, DiffusionSegLib.data.volume; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
