"""Column schemas of the module's result tables (Qt-free), in the form
:func:`ImbalanceSegSlicer.scene.table_node_from_rows` takes: name, type, unit, description,
as Slicer's SegmentStatistics tables carry them."""

from __future__ import annotations

from imbalanceseglib.segfile import PERFORMANCE_COLUMNS  # one definition, shared with predict's files

TABLE_COLUMNS = [
    {"name": "Segment", "type": "string", "description": "Class name from the model card"},
    {"name": "Voxel count", "type": "int", "unit": "voxels", "description": "Voxels assigned to the class"},
    {"name": "Volume", "type": "double", "unit": "ml", "description": "Segment volume"},
    {"name": "Mean probability", "type": "double", "unit": "",
     "description": "Mean predicted probability of the class over the voxels of its segment (empty: no voxels)"},
    {"name": "Reference voxel count", "type": "int", "unit": "voxels",
     "description": "Voxels of the matching reference segment"},
    {"name": "Dice", "type": "double", "unit": "",
     "description": "Dice against the reference segment with the same name (empty: no reference, or absent in both)"},
    {"name": "HD95", "type": "double", "unit": "mm",
     "description": "Larger of the two directed 95th percentiles of border-voxel distances (Metrics Reloaded/MONAI); "
                    "a missed or hallucinated structure gets the field-of-view diagonal (see Policy)"},
    {"name": "ASSD", "type": "double", "unit": "mm", "description": "Average symmetric surface distance (pooled mean)"},
    {"name": "Surface Dice", "type": "double", "unit": "",
     "description": "Normalised surface Dice at 2 mm tolerance (surface elements)"},
    {"name": "Policy", "type": "string", "unit": "",
     "description": "Edge-case policy applied: normal, both_empty, reference_empty, prediction_empty, image_wide, single_voxel"},
]

#: Row keys in table column order.
ROW_KEYS = [c["name"] for c in TABLE_COLUMNS]

PERFORMANCE_KEYS = [c["name"] for c in PERFORMANCE_COLUMNS]
#: Table attribute keeping the label-free estimator's rows (argmax segments), restored when a
#: class's segment returns to its argmax form.
ESTIMATOR_ROWS_ATTRIBUTE = "ImbalanceSeg.EstimatorRows"
#: JSON list of how the input differs from the training data (the result's ``findings``).
FINDINGS_ATTRIBUTE = "ImbalanceSeg.InputFindings"

#: The "Annotate next" table (suggestive annotation, ``ImbalanceSegLogic.suggestAnnotations``):
#: one row per unlabelled volume, by rank.
ANNOTATE_NEXT_COLUMNS = [
    {"name": "Rank", "type": "int", "description": "1 = annotate first; the chosen volumes come first"},
    {"name": "Volume", "type": "string", "description": "Unlabelled volume of the scene"},
    {"name": "Chosen", "type": "string", "description": "yes: among the volumes chosen for annotation"},
    {"name": "Uncertainty", "type": "double", "unit": "",
     "description": "The model's uncertainty on the volume, 0 to 1: per foreground class the mean of the normalised "
                    "entropy around the class and 1 - its estimated Dice, averaged over the classes (empty: random)"},
    {"name": "Representativeness gain", "type": "double", "unit": "",
     "description": "How much the volume adds to the coverage of the unlabelled volumes (sum of cosine similarities "
                    "of encoder features; a chosen volume: when it was picked; empty: uncertainty/random)"},
    {"name": "Most like", "type": "string",
     "description": "The chosen or labelled volume most similar to this one (empty: none, or itself)"},
    {"name": "Similarity", "type": "double", "unit": "", "description": "Cosine similarity to 'Most like'"},
    {"name": "Why", "type": "string", "description": "Why the volume is where it is in the ranking"},
]
#: Attribute of the module's "Annotate next" table node (value: the strategy); the table is reused.
ANNOTATE_NEXT_ATTRIBUTE = "ImbalanceSeg.AnnotateNext"
