"""One mesh through all frames: topology-consistent animation for shape keys (no bpy).

`register_sequence(meshes, ...) -> AnimatedMesh` is the public entry point; `cli.main` implements
`python -m ss4d_blender.engine register IN OUT`.
"""
from .sequence import choose_reference_frame, register_sequence, smooth_trajectories

__all__ = ["register_sequence", "choose_reference_frame", "smooth_trajectories"]
