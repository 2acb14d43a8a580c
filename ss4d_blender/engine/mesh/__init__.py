"""Meshes: sparse FlexiCubes, mesh-decoder features -> mesh, Gaussians -> mesh, cleanup."""
from .cleanup import (boundary_edge_count, clean_mesh, close_holes, decimate, drop_small_components,
                      euler_characteristic, is_consistently_oriented, is_watertight,
                      merge_duplicate_vertices, signed_volume)
from .decoder_to_mesh import mesh_from_decoder_features
from .flexicubes import FlexiCubesResult, flexicubes_extract
from .from_gaussians import mesh_from_gaussians

__all__ = [
    "flexicubes_extract", "FlexiCubesResult", "mesh_from_decoder_features", "mesh_from_gaussians",
    "clean_mesh", "merge_duplicate_vertices", "drop_small_components", "close_holes", "decimate",
    "euler_characteristic", "is_watertight", "is_consistently_oriented", "boundary_edge_count",
    "signed_volume",
]
