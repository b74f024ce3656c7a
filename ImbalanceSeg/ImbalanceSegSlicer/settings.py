"""The panel's run settings and where they are remembered (Qt-free).

One set of run settings (model, device, training method, output folder) is kept in the
module's parameter node (saved with the scene, as the typed parameter pack
``ImbalanceSegRunSettings`` in ``ImbalanceSeg.py``) and remembered between sessions in the
application settings. ``store`` is anything with QSettings' ``value(key, default)`` and
``setValue(key, value)``: ``qt.QSettings()`` in Slicer, a dict-backed object in tests.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

#: Field -> default of the run settings; the parameter pack declares the same fields (tested).
RUN_SETTINGS_DEFAULTS: Dict[str, str] = {"model": "", "device": "cpu", "method": "dice_ce", "outputFolder": ""}

#: Field -> application settings key.
SETTINGS_KEYS: Dict[str, str] = {
    "model": "ImbalanceSeg/Model",
    "device": "ImbalanceSeg/Device",
    "method": "ImbalanceSeg/TrainingMethod",
    "outputFolder": "ImbalanceSeg/TrainingOutputFolder",
}
MODEL_FOLDERS_KEY = "ImbalanceSeg/ModelFolders"


def _text(value: Any, default: str) -> str:
    return value if isinstance(value, str) else default


def remembered(store, defaults: Dict[str, str] = RUN_SETTINGS_DEFAULTS) -> Dict[str, str]:
    """The run settings remembered in ``store`` (defaults for what it lacks or holds badly)."""
    return {name: _text(store.value(SETTINGS_KEYS[name], default), default) for name, default in defaults.items()}


def remember(store, values: Dict[str, Any]) -> None:
    """Remember run settings (only the known fields; unknown names are a programming error)."""
    unknown = set(values) - set(SETTINGS_KEYS)
    if unknown:
        raise KeyError(f"unknown run settings {sorted(unknown)}; known: {sorted(SETTINGS_KEYS)}")
    for name, value in values.items():
        store.setValue(SETTINGS_KEYS[name], str(value))


def model_folders(store) -> List[str]:
    """The model folders the user added (QSettings returns a single string for a one-item list)."""
    folders = store.value(MODEL_FOLDERS_KEY, [])
    if not folders:
        return []
    if isinstance(folders, str):
        return [folders]
    return [str(f) for f in folders]


def add_model_folder(store, folder: str) -> List[str]:
    folders = model_folders(store)
    if folder and folder not in folders:
        folders.append(folder)
        store.setValue(MODEL_FOLDERS_KEY, folders)
    return folders


def pick(choice: str, available: Sequence[str], fallback: str = "") -> str:
    """``choice`` when it is available, else ``fallback`` when that is, else the first available."""
    if choice in available:
        return choice
    if fallback in available:
        return fallback
    return available[0] if available else ""


class MemoryStore:
    """A dict with QSettings' two methods (tests, scripts)."""

    def __init__(self, values: Dict[str, Any] = None):
        self.values = dict(values or {})

    def value(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def setValue(self, key: str, value: Any) -> None:
        self.values[key] = value
