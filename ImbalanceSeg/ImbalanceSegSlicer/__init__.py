"""Qt-free helpers that work on a real MRML scene (slicer-core or 3D Slicer).

Submodules:

* ``scene``: SimpleITK <-> MRML volume/segmentation conversion, colour tables,
  tables, atomic saving of nodes and scenes.
* ``rendering``: offscreen slice snapshots rendered by Slicer's slice logic and
  slice displayable managers.
"""
