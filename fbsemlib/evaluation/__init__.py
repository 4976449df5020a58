"""Evaluation: image-quality metrics (one NRMSE, SSIM, lesion contrast) and the comparison of
a trained model with the baselines (tuned on validation) on a test split."""

from fbsemlib.evaluation import metrics
from fbsemlib.evaluation.baselines import BaselineConfig
from fbsemlib.evaluation.evaluator import evaluate
from fbsemlib.evaluation.user_data import reconstruct_file
