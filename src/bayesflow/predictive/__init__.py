"""Predictive uncertainty from posterior samples of any method: the posterior predictive, its split into
aleatoric and epistemic parts (classification, language-model tokens and sequences, Gaussian
regression), and the OOD-detection scores of each part."""

from bayesflow.predictive.classification import (
    ClassificationUncertainty,
    PredictiveSums,
    classification_uncertainty,
    decompose,
    predictive_sums,
)
from bayesflow.predictive.ood import aupr, auroc, fpr_at_tpr, ood_detection
from bayesflow.predictive.regression import RegressionUncertainty, regression_uncertainty
from bayesflow.predictive.tokens import SequenceUncertainty, sequence_uncertainty

__all__ = [
    "ClassificationUncertainty",
    "PredictiveSums",
    "RegressionUncertainty",
    "SequenceUncertainty",
    "aupr",
    "auroc",
    "classification_uncertainty",
    "decompose",
    "fpr_at_tpr",
    "ood_detection",
    "predictive_sums",
    "regression_uncertainty",
    "sequence_uncertainty",
]
