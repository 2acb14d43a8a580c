"""Sparse voxel tensors and the operations the SS4D models need, in plain PyTorch:
submanifold 3D / 4D / 1D convolutions with cached neighbour maps, spatial and temporal pooling,
subdivision. See tensor.py for the data layout."""
from .conv import SparseConv1d, SparseConv3d, SparseConv4d, submanifold_conv
from .neighbours import STATS as NEIGHBOUR_STATS, kernel_offsets, neighbour_map
from .spatial import SparseDownsample, SparseDownsample_t, SparseSubdivide, SparseUpsample, SparseUpsample_t
from .tensor import SparseTensor

__all__ = [
    "SparseTensor", "SparseConv3d", "SparseConv4d", "SparseConv1d", "submanifold_conv",
    "SparseDownsample", "SparseUpsample", "SparseDownsample_t", "SparseUpsample_t", "SparseSubdivide",
    "neighbour_map", "kernel_offsets", "NEIGHBOUR_STATS",
]
