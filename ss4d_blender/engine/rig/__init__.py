"""Bones and skin weights fitted to the generated vertex animation (skinning decomposition; no bpy).

`fit_rig(vertices, faces, ...) -> Rig` is the entry point; `Rig.save` / `Rig.load` read and write RIG.npz;
`cli` implements `engine rig ANIM.npz RIG.npz`.
"""
from .decompose import RigSettings, fit_rig
from .rig_file import Rig

__all__ = ["fit_rig", "Rig", "RigSettings"]
