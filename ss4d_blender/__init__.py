"""SS4D for Blender: video of a moving object -> animated mesh with shape keys.

This file is the Blender extension's entry point. It must stay importable without bpy, because
`ss4d_blender.engine` (plain PyTorch) lives below it and is used from the CLI and the tests.
Everything that needs bpy is imported inside register()/unregister().
"""


def register():
    from .blender import register as _register

    _register()


def unregister():
    from .blender import unregister as _unregister

    _unregister()
