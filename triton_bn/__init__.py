"""triton_bn: fused batch normalization for PyTorch on Triton kernels.

Public API: ``batch_norm`` (functional), ``BatchNorm1d/2d/3d`` (modules), ``convert_model``,
``SUPPORTED_ACTIVATIONS``. Set ``TRITON_INTERPRET=1`` before importing to run the kernels on CPU
tensors through the Triton interpreter.
"""
__version__ = "0.1.0"  # first: modules below read it (the tuning cache's file name)

from .activations import SUPPORTED_ACTIVATIONS
from .convert import FusionReport, convert_model, convert_sync_batchnorm
from .coverage import fusion_coverage
from .fold import FrozenBatchNorm, fold_batch_norms
from .functional import batch_norm
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .sync import SyncBatchNorm, SyncBatchNormAct

__all__ = ["batch_norm", "convert_model", "FusionReport", "fusion_coverage", "fold_batch_norms", "FrozenBatchNorm", "BatchNorm1d", "BatchNorm2d",
           "BatchNorm3d", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "SyncBatchNorm", "SyncBatchNormAct",
           "convert_sync_batchnorm", "SUPPORTED_ACTIVATIONS", "__version__"]
