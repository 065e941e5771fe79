"""Evaluation: sampling to .npz, FID/sFID/IS/precision/recall (ADM evaluator definitions), rFID/PSNR/SSIM for
tokenizers, CLIP score for text-to-image, and the watcher that scores a training run's exports.

Imports nothing of argen but `argen.model`, `argen.errors`, `argen.device` and `argen.launcher.dist_env`.
"""

# Bump when any number this package produces could change for the same inputs (feature network wiring, resize,
# metric definition). Every result records it, so numbers from different evaluator versions are never mixed.
EVALUATOR_VERSION = "argen-adm-1"
