"""Bones and skin weights fitted to the generated vertex animation (skinning decomposition; no bpy).

`fit_rig(vertices, faces, ...) -> Rig` is the entry point; `Rig.save` / `Rig.load` read and write RIG.npz;
`cli` implements `engine rig ANIM.npz RIG.npz`. `Rig` (numpy only) loads without torch, so the add-on can
read a rig file that its runtime wrote; `fit_rig` and `RigSettings` import torch when first used.
"""
from .rig_file import Rig

__all__ = ["Rig", "RigSettings", "fit_rig"]


def __getattr__(name: str):
    if name in ("fit_rig", "RigSettings"):
        from . import decompose

        return getattr(decompose, name)
    raise AttributeError(name)
