"""SS4D engine: plain PyTorch + numpy, no bpy.

Stages (each takes and returns plain data): decode video -> matte -> preprocess -> encode (DINOv2)
-> sample structure -> sample latents -> decode -> mesh -> register. The Blender layer imports this
package; nothing here imports bpy.
"""
