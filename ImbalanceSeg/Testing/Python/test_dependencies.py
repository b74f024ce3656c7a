"""What the panel checks and installs on first use (ImbalanceSegSlicer.dependencies) and the run
settings it remembers (ImbalanceSegSlicer.settings): Qt-free, no package is imported or installed."""

import re
import sys
from pathlib import Path

import pytest

from ImbalanceSegSlicer import dependencies as deps
from ImbalanceSegSlicer import settings

ROOT = Path(__file__).resolve().parents[3]


def test_minimum_versions_are_the_librarys_own():
    text = (ROOT / "ImbalanceSegLib" / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    declared = dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)"', block))
    for module, (dist, minimum) in deps.REQUIREMENTS.items():
        assert declared.get(dist) == minimum, (dist, declared.get(dist), minimum)
    # What Slicer does not ship is all checked (numpy and SimpleITK come with Slicer).
    assert set(declared) - {"numpy", "SimpleITK"} == {d for d, _ in deps.REQUIREMENTS.values()}


@pytest.mark.parametrize("text, expected", [("2.13.0+cpu", (2, 13, 0)), ("1.6.1rc1", (1, 6, 1)), ("0.4", (0, 4)),
                                            ("2.1.0.post1", (2, 1, 0)), ("10", (10,))])
def test_version_tuple(text, expected):
    assert deps.version_tuple(text) == expected


def test_problems_names_missing_and_too_old_packages_without_importing_them():
    installed = {"torch": "1.13.1", "monai": None, "safetensors": "0.8.0", "scipy": "1.17.1"}
    found = deps.problems(version_of=lambda module, dist: installed[module])
    assert [(p.module, p.installed) for p in found] == [("torch", "1.13.1"), ("monai", None)]
    assert deps.describe(found) == ("torch 1.13.1 is installed, ImbalanceSeg needs >= 2.1; "
                                    "monai (not installed; needs >= 1.3)")
    assert [p.requirement for p in found] == ["torch>=2.1", "monai>=1.3"]


def test_the_real_environment_passes_and_nothing_was_imported_to_check_it():
    before = set(sys.modules)
    assert deps.problems() == []
    assert not ({"monai", "safetensors"} & (set(sys.modules) - before))


def test_install_sends_torch_to_pytorch_utils_the_rest_to_pip_and_rechecks():
    torch_calls, pip_calls = [], []
    found = [deps.Problem("torch", "torch", "2.1", "1.13.1"), deps.Problem("monai", "monai", "1.3", None)]
    deps.install(found, torch_calls.append, pip_calls.append, recheck=lambda: [])
    assert torch_calls == ["torch>=2.1"] and pip_calls == [["monai>=1.3"]]
    with pytest.raises(RuntimeError, match=r"still missing or too old: torch 2.0.0 is installed, ImbalanceSeg "
                                           r"needs >= 2.1\. Update PyTorch in the PyTorch Utils module"):
        deps.install(found, torch_calls.append, pip_calls.append,
                     recheck=lambda: [deps.Problem("torch", "torch", "2.1", "2.0.0")])


def test_run_settings_are_remembered_and_read_back_with_defaults():
    store = settings.MemoryStore()
    assert settings.remembered(store) == settings.RUN_SETTINGS_DEFAULTS
    settings.remember(store, {"device": "cuda", "method": "cps"})
    assert settings.remembered(store) == {**settings.RUN_SETTINGS_DEFAULTS, "device": "cuda", "method": "cps"}
    store.setValue(settings.SETTINGS_KEYS["model"], 7)  # a damaged settings file: the default is used
    assert settings.remembered(store)["model"] == ""
    with pytest.raises(KeyError, match="unknown run settings"):
        settings.remember(store, {"devise": "cpu"})


def test_model_folders_accept_qsettings_single_string_and_are_not_repeated():
    store = settings.MemoryStore({settings.MODEL_FOLDERS_KEY: "/models/a"})
    assert settings.model_folders(store) == ["/models/a"]
    assert settings.add_model_folder(store, "/models/b") == ["/models/a", "/models/b"]
    assert settings.add_model_folder(store, "/models/a") == ["/models/a", "/models/b"]
    assert settings.pick("cuda", ["cpu"], "cpu") == "cpu"
    assert settings.pick("cps", ["dice_ce", "cps"]) == "cps"
    assert settings.pick("x", []) == ""
