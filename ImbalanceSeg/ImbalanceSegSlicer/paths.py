"""Where the module's files are, in the source tree and in an installed extension (Qt-free).

Installed extension: the module file, ``ImbalanceSegSlicer/``, ``imbalanceseglib/`` and
``Resources/`` sit side by side in Slicer's qt-scripted-modules folder. Source tree: the library
lives in ``../ImbalanceSegLib/src`` and the shared resources in ``../Resources``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List

#: The folder of ``ImbalanceSeg.py`` (the module file).
MODULE_DIR = Path(__file__).resolve().parent.parent


def add_library_paths() -> None:
    """Make ``imbalanceseglib`` and ``ImbalanceSegSlicer`` importable (idempotent)."""
    for candidate in (MODULE_DIR, MODULE_DIR.parent / "ImbalanceSegLib" / "src"):
        if candidate.is_dir() and str(candidate) not in sys.path:
            sys.path.insert(0, str(candidate))


def _resource_dir(name: str) -> Path:
    for candidate in (MODULE_DIR / "Resources" / name, MODULE_DIR.parent / "Resources" / name):
        if candidate.is_dir():
            return candidate
    return MODULE_DIR / "Resources" / name


#: The bundled model the panel offers first (the demo model trained on real patients).
DEFAULT_BUNDLED_MODEL = "demo_hippocampus.imbseg"


def bundled_models_dir() -> Path:
    """Folder of the models that ship with the extension."""
    return _resource_dir("Models")


def demo_data_dir() -> Path:
    """Folder of the demo case (volume, reference labels, class names, attribution)."""
    return _resource_dir("Demo")


def icon_path() -> Path:
    return MODULE_DIR / "Resources" / "Icons" / "ImbalanceSeg.png"


def sample_data_sources() -> List[Dict[str, Any]]:
    """What the module adds to Slicer's Sample Data module: the demo volumes (shipped with the
    extension, so nothing is downloaded): a held-out hippocampus patient (MSD Task04) and the
    whole-head Colin27 T1. Their reference segmentations, with class names, are loaded by
    ``ImbalanceSegSlicer.scenarios.load_demo_case``."""
    demo = demo_data_dir()
    return [{"category": "ImbalanceSeg", "sampleName": "ImbalanceSegDemoHippocampus",
             "thumbnailFileName": str(icon_path()),
             "uris": (demo / "demo_hippocampus_image.nii.gz").as_uri(),
             "fileNames": "ImbalanceSegDemoHippocampus.nii.gz",
             "nodeNames": "DemoHippocampus", "loadFileType": "VolumeFile"},
            {"category": "ImbalanceSeg", "sampleName": "ImbalanceSegDemoBrainT1",
             "thumbnailFileName": str(icon_path()),
             "uris": (demo / "demo_t1.nrrd").as_uri(), "fileNames": "ImbalanceSegDemoBrainT1.nrrd",
             "nodeNames": "DemoBrainT1", "loadFileType": "VolumeFile"}]
