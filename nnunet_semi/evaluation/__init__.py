"""Evaluation: Dice, Jaccard, HD95, ASD/ASSD in mm and voxels, folder evaluation and comparison.

See :mod:`nnunet_semi.evaluation.metrics` (definitions, empty-mask policies) and
:mod:`nnunet_semi.evaluation.evaluate` (folders, summary JSON, markdown tables).
"""
from nnunet_semi.evaluation.evaluate import (
    EvaluationError, compare_folders, comparison_markdown, evaluate_case, evaluate_folder, labels_from_dataset_json,
    markdown_table, paired_difference, write_markdown_table,
)
from nnunet_semi.evaluation.metrics import (
    DEFAULT_EMPTY_POLICY, EMPTY_POLICIES, METRICS, asd, assd, binary_metrics, dice, hd95, jaccard,
    multilabel_metrics, surface_distances,
)

__all__ = [
    "EvaluationError", "compare_folders", "comparison_markdown", "evaluate_case", "evaluate_folder",
    "labels_from_dataset_json", "markdown_table", "paired_difference", "write_markdown_table",
    "DEFAULT_EMPTY_POLICY", "EMPTY_POLICIES", "METRICS", "asd", "assd", "binary_metrics", "dice", "hd95", "jaccard",
    "multilabel_metrics", "surface_distances",
]
