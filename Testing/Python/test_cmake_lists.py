"""The CMake files must name every file the module and library ship, import or read.

A file missing from MODULE_PYTHON_SCRIPTS only shows up after the extension is
installed (ImportError in the user's Slicer), so this is checked on every test run.
"""

import ast
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "ImbalanceSeg"
LIB = ROOT / "ImbalanceSegLib"


def cmake_list(path: Path, variable: str):
    text = path.read_text()
    m = re.search(r"set\(\s*" + re.escape(variable) + r"\s+(.*?)\)", text, re.S)
    assert m, f"{variable} not found in {path}"
    items = [line.split("#")[0].strip() for line in m.group(1).splitlines()]
    return [i.replace("${MODULE_NAME}", "ImbalanceSeg") for i in items if i]


def cmake_var(path: Path, variable: str) -> str:
    m = re.search(r'set\(\s*' + re.escape(variable) + r'\s+"?([^")]*)"?\)', path.read_text())
    assert m, f"{variable} not set in {path}"
    return m.group(1)


def module_python_files():
    return sorted(str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py")
                  if "Testing" not in p.relative_to(MODULE).parts)


def test_module_scripts_list_every_shipped_python_file():
    listed = cmake_list(MODULE / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS")
    assert sorted(listed) == module_python_files()


def test_every_module_import_is_listed():
    listed = set(cmake_list(MODULE / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS"))
    lib_listed = {".".join(Path(p).relative_to("src/imbalanceseglib").with_suffix("").parts)
                  for p in cmake_list(LIB / "CMakeLists.txt", "IMBALANCESEGLIB_PYTHON_SCRIPTS")}
    for path in MODULE.rglob("*.py"):
        if "Testing" in path.relative_to(MODULE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "ImbalanceSegSlicer" and len(parts) > 1 and (MODULE / "ImbalanceSegSlicer" / f"{parts[1]}.py").exists():
                    assert f"ImbalanceSegSlicer/{parts[1]}.py" in listed, f"{path.name} imports {name}"
                if parts[0] == "imbalanceseglib" and len(parts) > 1:
                    for k in range(len(parts), 1, -1):  # the longest prefix that is a module file
                        module = LIB / "src" / Path(*parts[:k]).with_suffix(".py")
                        package = LIB / "src" / Path(*parts[:k]) / "__init__.py"
                        if module.exists() or package.exists():
                            key = ".".join(parts[1:k]) + (".__init__" if package.exists() else "")
                            assert key in lib_listed, f"{path.name} imports {name}"
                            break


def test_library_cmake_lists_every_module_of_the_package():
    listed = sorted(cmake_list(LIB / "CMakeLists.txt", "IMBALANCESEGLIB_PYTHON_SCRIPTS"))
    actual = sorted(str(p.relative_to(LIB)) for p in (LIB / "src" / "imbalanceseglib").rglob("*.py")
                    if "__pycache__" not in p.parts)
    assert listed == actual


def test_resources_exist_and_what_the_code_reads_is_installed():
    for res in cmake_list(MODULE / "CMakeLists.txt", "MODULE_PYTHON_RESOURCES"):
        assert (MODULE / res).is_file(), res
    shared = cmake_list(ROOT / "CMakeLists.txt", "ImbalanceSeg_SHARED_RESOURCES")
    for res in shared:
        assert (ROOT / res).is_file(), res
    # Files the module reads at run time (scenarios.py and the Logic's model folder).
    scen = (MODULE / "ImbalanceSegSlicer" / "scenarios.py").read_text()
    for name in re.findall(r'"((?:demo_[a-z0-9_]+|classes)\.(?:nrrd|imbseg|nii\.gz|json))"', scen):
        assert any(s.endswith("/" + name) for s in shared), f"{name} is read but not installed"
    assert "Resources/Demo/classes.json" in shared
    assert "Resources/Models/demo_hippocampus.imbseg" in shared and "Resources/Demo/demo_hippocampus_image.nii.gz" in shared


def test_extension_metadata_and_index_entry_agree():
    top = ROOT / "CMakeLists.txt"
    text = top.read_text()
    assert "project(ImbalanceSeg)" in text
    assert cmake_var(top, "EXTENSION_CATEGORY") == "Segmentation"
    assert cmake_var(top, "EXTENSION_DEPENDS") == "PyTorch"
    for sub in ("ImbalanceSeg", "ImbalanceSegLib"):
        assert f"add_subdirectory({sub})" in text
    entry = json.loads((ROOT / "ImbalanceSeg.json").read_text())
    assert entry["build_dependencies"] == cmake_var(top, "EXTENSION_DEPENDS").split()
    assert entry["category"] == cmake_var(top, "EXTENSION_CATEGORY")
    module = (MODULE / "CMakeLists.txt").read_text()
    assert "WITH_GENERIC_TESTS" in module and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module


def test_icon_is_128_pixels_square():
    import SimpleITK as sitk
    for icon in (ROOT / "Resources" / "Icons" / "ImbalanceSeg.png", MODULE / "Resources" / "Icons" / "ImbalanceSeg.png"):
        img = sitk.ReadImage(str(icon))
        assert img.GetSize() == (128, 128), icon


def test_screenshots_listed_in_the_metadata_exist_and_are_real_renders():
    import SimpleITK as sitk
    import numpy as np
    urls = cmake_var(ROOT / "CMakeLists.txt", "EXTENSION_SCREENSHOTURLS").split()
    assert len(urls) >= 2
    for url in urls:
        rel = url.split("/main/", 1)[1]
        path = ROOT / rel
        assert path.is_file(), rel
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        assert arr.shape[0] >= 512 and arr.std() > 20, rel  # not blank
    icon_url = cmake_var(ROOT / "CMakeLists.txt", "EXTENSION_ICONURL")
    assert (ROOT / icon_url.split("/main/", 1)[1]).is_file()


def test_index_entry_names_a_slicer_repository_and_the_metadata_points_to_it():
    """The Extensions Index checks that the extension's repository name starts with "Slicer"
    (SlicerMONAIAuto3DSeg, SlicerNNUnet, ...) while the extension name itself does not; the
    homepage, icon and screenshots must come from that same repository."""
    import re
    entry = json.loads((ROOT / "ImbalanceSeg.json").read_text())
    m = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+?)\.git", entry["scm_url"])
    assert m, entry["scm_url"]
    owner, repo = m.groups()
    assert repo.startswith("Slicer") and repo == "Slicer" + "ImbalanceSeg", repo
    assert not (ROOT / "ImbalanceSeg.json").stem.startswith("Slicer")
    top = ROOT / "CMakeLists.txt"
    assert cmake_var(top, "EXTENSION_HOMEPAGE").startswith(f"https://github.com/{owner}/{repo}")
    raw = f"https://raw.githubusercontent.com/{owner}/{repo}/{entry['scm_revision']}/"
    for url in [cmake_var(top, "EXTENSION_ICONURL"), *cmake_var(top, "EXTENSION_SCREENSHOTURLS").split()]:
        assert url.startswith(raw), url
