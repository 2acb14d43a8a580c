"""The Blender layer of SS4D for Blender: properties, preferences, operators, panels.
Imports the engine's bpy-free modules (never torch: the model runs in a worker process)."""
from __future__ import annotations

from . import armature, operators, panels, preferences, properties

MODULES = (properties, preferences, operators, armature, panels)


def register():
    for module in MODULES:
        module.register()


def unregister():
    for module in reversed(MODULES):
        module.unregister()
