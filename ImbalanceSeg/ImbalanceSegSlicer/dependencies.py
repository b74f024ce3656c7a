"""The Python packages the module needs besides what Slicer ships, checked without importing
them (Qt-free).

Inside Slicer, torch comes from the PyTorch extension (``PyTorchUtils``, which picks the build
for the machine's GPU); MONAI, safetensors and scipy come from pip. Nothing here imports torch:
versions are read from the installed distributions' metadata, so the panel can open, say what
is missing or too old, and offer to install it. The minimum versions are those of
``ImbalanceSegLib/pyproject.toml`` (a test keeps the two equal).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

#: import name -> (distribution name, minimum version) of what the library needs beyond Slicer's
#: own packages (numpy and SimpleITK ship with Slicer; scipy does not always).
REQUIREMENTS: Dict[str, Tuple[str, str]] = {
    "torch": ("torch", "2.1"),
    "monai": ("monai", "1.3"),
    "safetensors": ("safetensors", "0.4"),
    "scipy": ("scipy", "1.10"),
}

#: Installed through the PyTorch extension rather than pip.
TORCH = "torch"


@dataclass(frozen=True)
class Problem:
    """A package that is missing (``installed`` None) or older than ``required``."""

    module: str
    distribution: str
    required: str
    installed: Optional[str]

    @property
    def requirement(self) -> str:
        return f"{self.distribution}>={self.required}"

    def describe(self) -> str:
        if self.installed is None:
            return f"{self.distribution} (not installed; needs >= {self.required})"
        return f"{self.distribution} {self.installed} is installed, ImbalanceSeg needs >= {self.required}"


def version_tuple(version: str) -> Tuple[int, ...]:
    """Leading numeric release parts: '2.13.0+cpu' -> (2, 13, 0); '1.6.1rc1' -> (1, 6, 1)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
        if m.end() != len(piece):  # '1rc1': the pre-release suffix ends the release part
            break
    return tuple(parts)


def installed_version(module: str, distribution: str) -> Optional[str]:
    """The installed version, or None when the module cannot be found. Nothing is imported."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "0"  # importable but without metadata: treat as too old to be sure


def problems(requirements: Optional[Dict[str, Tuple[str, str]]] = None,
             version_of: Callable[[str, str], Optional[str]] = installed_version) -> List[Problem]:
    """Missing or outdated packages, in the order of ``requirements``."""
    # Packages pip installed a moment ago (another process): Python's documentation asks for
    # this before finding modules created after the interpreter started.
    importlib.invalidate_caches()
    out = []
    for module, (dist, minimum) in (requirements or REQUIREMENTS).items():
        have = version_of(module, dist)
        if have is None or version_tuple(have) < version_tuple(minimum):
            out.append(Problem(module, dist, minimum, have))
    return out


def describe(found: Sequence[Problem]) -> str:
    return "; ".join(p.describe() for p in found)


def install(found: Sequence[Problem], install_torch: Callable[[str], None],
            pip_install: Callable[[List[str]], None],
            recheck: Callable[[], List[Problem]] = problems) -> None:
    """Install what ``found`` lists: torch through ``install_torch(requirement)`` (the PyTorch
    extension), the rest through ``pip_install(requirements)``. Raises RuntimeError naming what
    is still missing or too old afterwards (a failed or refused install)."""
    if any(p.module == TORCH for p in found):
        install_torch(next(p for p in found if p.module == TORCH).requirement)
    others = [p.requirement for p in found if p.module != TORCH]
    if others:
        pip_install(others)
    left = recheck()
    if left:
        hint = (" Update PyTorch in the PyTorch Utils module (Utilities > PyTorch Utils)."
                if any(p.module == TORCH for p in left) else "")
        raise RuntimeError(f"after installing, these Python packages are still missing or too old: "
                           f"{describe(left)}.{hint}")
