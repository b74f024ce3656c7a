"""ImbalanceSegLib: imbalance-aware 3D segmentation for medical images.

The library is independent of 3D Slicer: it works on SimpleITK images and numpy
arrays, and is used by the ImbalanceSeg Slicer module, the command line
(``imbalanceseg``) and plain Python scripts.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
