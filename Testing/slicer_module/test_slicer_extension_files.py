"""The extension's files: CMake lists, .ui widget names, icon, requirements, headless entry, Qt-free import."""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET

from helpers import REPO

MODULE = REPO / "DiffusionSeg"
SOURCE = (MODULE / "DiffusionSeg.py").read_text()


def _cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"set({variable} ...) not found"
    return [item for item in match.group(1).split() if not item.startswith("#")]


def test_top_level_cmake_has_extension_metadata():
    text = (REPO / "CMakeLists.txt").read_text()
    assert re.search(r"project\(DiffusionSeg\)", text)
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):  # fmt: skip
        assert re.search(rf"set\({key} ", text), key
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text and 'set(EXTENSION_DEPENDS "PyTorch")' in text
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(DiffusionSeg)",
                 "include(${Slicer_EXTENSION_CPACK})"):  # fmt: skip
        assert line in text


def test_module_cmake_lists_every_library_file_and_only_existing_files():
    text = (MODULE / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule(" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    listed = _cmake_list(text, "MODULE_LIBRARY_SCRIPTS")
    missing = [f for f in listed if not (REPO / f).is_file()]
    assert not missing, f"CMake lists files that do not exist: {missing}"
    on_disk = sorted(str(p.relative_to(REPO)) for p in (REPO / "DiffusionSegLib").rglob("*.py")
                     if "__pycache__" not in p.parts)  # fmt: skip
    unlisted = sorted(set(on_disk) - set(listed))
    assert not unlisted, f"add these to MODULE_LIBRARY_SCRIPTS in DiffusionSeg/CMakeLists.txt: {unlisted}"
    for item in _cmake_list(text, "MODULE_PYTHON_SCRIPTS") + _cmake_list(text, "MODULE_PYTHON_RESOURCES"):
        path = MODULE / item.replace("${MODULE_NAME}", "DiffusionSeg")
        assert path.is_file(), f"CMake lists {item}, which does not exist"


def test_ui_file_parses_and_holds_every_widget_the_code_uses():
    root = ET.parse(MODULE / "Resources" / "UI" / "DiffusionSeg.ui").getroot()
    names = {w.get("name") for w in root.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", SOURCE))
    assert used and not used - names, f"widgets used in DiffusionSeg.py but missing from the .ui: {used - names}"
    # every SlicerParameterName binding names a field of the parameter node
    block = SOURCE.split("class DiffusionSegParameterNode:", 1)[1].split("\n\n\n", 1)[0]
    fields = set(re.findall(r"^\s{8}(\w+):", block, re.M))
    bound = {p.find("string").text for p in root.iter("property") if p.get("name") == "SlicerParameterName"}
    assert bound and not bound - fields, f"parameters bound in the .ui but not declared: {bound - fields}"


def test_icon_is_a_128_pixel_png():
    data = (MODULE / "Resources" / "Icons" / "DiffusionSeg.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (128, 128)


def test_requirements_have_lower_bounds_only():
    text = (MODULE / "Resources" / "requirements.txt").read_text()
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    requirements = [line for line in lines if line]
    assert requirements and "monai>=1.5" in requirements
    assert all(">=" in r and "==" not in r and "<" not in r for r in requirements), requirements
    assert not any(r.startswith(("torch", "SimpleITK", "numpy")) for r in requirements)  # from Slicer / PyTorch ext


def test_module_loads_without_qt_and_without_torch():
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('DiffusionSeg', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); sys.modules['DiffusionSeg'] = m; spec.loader.exec_module(m); "
            "print(m.HAVE_SLICER_APP, 'torch' in sys.modules, 'monai' in sys.modules, 'DiffusionSegLib.probe' in "
            "sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, str(MODULE / "DiffusionSeg.py")], capture_output=True, text=True,
                         timeout=120, cwd="/")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "False", "False"]
    assert "Medical Semantic Segmentation with Diffusion Pretrain" in SOURCE and '"Segmentation"' in SOURCE


def test_progress_lines_and_helpers(ds, tmp_path):
    assert ds.parseProgressLine("DIFFUSIONSEG_PROGRESS 0.25 window 3/12") == (0.25, "window 3/12")
    assert ds.parseProgressLine("DIFFUSIONSEG_PROGRESS 7 done") == (1.0, "done")
    assert ds.parseProgressLine("probe:  45%|####") is None
    assert ds.parseProgressLine("DIFFUSIONSEG_PROGRESS nan? x") is None
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\nnumpy>=1.0\nsurely-not-installed-pkg>=1.0\n")
    assert ds.missingRequirements(requirements) == ["surely-not-installed-pkg>=1.0"]
    assert ds.readWeightsMetadata(requirements) == {}


def test_headless_pretrain_script_contract():
    text = (REPO / "pretrain.py").read_text()
    assert "sys.path.insert(0, str(Path(__file__).resolve().parent))" in text
    assert 'sys.exit(main(["pretrain"' in text and '"--"' in text
    out = subprocess.run([sys.executable, str(REPO / "pretrain.py"), "--", "--help"], capture_output=True, text=True,
                         timeout=120, cwd="/")  # fmt: skip
    assert out.returncode == 0 and "pretrain" in out.stdout
