"""Per-scene settings of the SS4D panel (`scene.ss4d`) and the state of a running job."""
from __future__ import annotations

import bpy
from bpy.props import (BoolProperty, EnumProperty, FloatProperty, FloatVectorProperty, IntProperty,
                       StringProperty)


class SS4D_PG_settings(bpy.types.PropertyGroup):
    use_strip_range: BoolProperty(name="Use Strip Range", default=True,
                                  description="Generate from the whole range the strip shows")
    frame_start: IntProperty(name="Start", default=1, description="First scene frame to use")
    frame_end: IntProperty(name="End", default=32, description="Last scene frame to use")
    frame_choice: EnumProperty(name="Frames", default="COUNT", items=[
        ("COUNT", "Spread", "A number of frames spread evenly over the range (fast; the timeline blends "
                            "linearly between them)"),
        ("ALL", "All Frames", "Every frame of the range (or every Step-th), generated in overlapping windows: "
                              "a shape key on every generated frame"),
    ], description="Which frames of the range are generated")
    num_frames: IntProperty(name="Frames", default=32, min=2, max=256,
                            description="Frames to generate, spread evenly over the range")
    frame_step: IntProperty(name="Step", default=1, min=1, max=100,
                            description="All Frames: use every Step-th frame (2 halves time and memory; the "
                                        "timeline blends linearly between generated frames)")
    window: IntProperty(name="Window", default=32, min=2, max=256,
                        description="Frames the model generates at once (even; 32, the length it was trained on); "
                                    "more frames are generated in overlapping windows")
    overlap: IntProperty(name="Overlap", default=8, min=0, max=254,
                         description="Frames each window shares with the one before (even, below Window): more "
                                     "gives smoother joins but more windows")
    timeline: EnumProperty(name="Timeline", default="SHAPE_KEYS", items=[
        ("SHAPE_KEYS", "Shape Keys", "One shape key per generated frame, stored in the .blend"),
        ("MESH_CACHE", "Mesh Cache", "A Mesh Cache modifier reading a .pc2 file in ss4d_cache/ beside the .blend "
                                     "(for minute-long clips: the .blend stays small; keep the file with it)"),
    ], description="How the animation is stored")
    matting: EnumProperty(name="Matting", default="AUTO", items=[
        ("AUTO", "Automatic", "The clip's transparency when it has some, otherwise Learned"),
        ("ALPHA", "Alpha in Source", "The clip has transparency (PNG sequence, ProRes 4444, WebM with alpha)"),
        ("LEARNED", "Learned (BiRefNet)", "Remove the background of any ordinary video with a learned model "
                                          "(BiRefNet, MIT licence)"),
        ("CHROMA", "Chroma Key", "Remove a green / blue screen background"),
    ])
    matting_quality: EnumProperty(name="Quality", default="BEST", items=[
        ("BEST", "Best", "BiRefNet (Swin-L, 885 MB download)"),
        ("FAST", "Fast", "BiRefNet_lite (Swin-T, 180 MB download): faster, less memory"),
    ], description="Which learned matting model")
    auto_key_color: BoolProperty(name="Measure Key Color", default=True,
                                 description="Take the key colour from the screen at the frame border")
    key_color: FloatVectorProperty(name="Key Color", subtype="COLOR", size=3, min=0, max=1, default=(0.0, 1.0, 0.0),
                                   description="The screen's colour, when it is not measured")
    tolerance: FloatProperty(name="Tolerance", default=0.12, min=0.0, max=0.8,
                             description="Colours this close to the key colour become transparent")
    softness: FloatProperty(name="Softness", default=0.08, min=0.0, max=0.5, description="Width of the soft edge")
    seed: IntProperty(name="Seed", default=0, min=0)
    steps: IntProperty(name="Steps", default=0, min=0, max=200, description="Sampling steps (0 = the model's default)")
    guidance: FloatProperty(name="Guidance", default=0.0, min=0.0, max=20.0,
                            description="Guidance strength of the structure stage (0 = the model's default)")
    target_vertices: IntProperty(name="Vertices", default=20000, min=500, max=500000,
                                 description="Vertex count of the animated mesh")
    auto_reference: BoolProperty(name="Automatic Reference", default=True,
                                 description="Take the mesh's topology from the most complete generated shape")
    reference_frame: IntProperty(name="Reference Frame", default=1,
                                 description="Timeline frame whose generated shape gives the mesh's topology "
                                             "(the nearest generated frame)")
    smoothing: FloatProperty(name="Smoothing", default=0.0, min=0.0, max=10.0,
                             description="Temporal smoothing of vertex trajectories (0 = off)")
    height: FloatProperty(name="Height", default=1.8, min=0.001, unit="LENGTH", description="Object height")
    collection: StringProperty(name="Collection", default="SS4D", description="Collection for the result")
    # state of a running job (shown by the panels)
    running: BoolProperty(default=False, options={"SKIP_SAVE"})
    progress: FloatProperty(default=0.0, min=0.0, max=1.0, subtype="FACTOR", options={"SKIP_SAVE"})
    stage: StringProperty(default="", options={"SKIP_SAVE"})
    last_message: StringProperty(default="", options={"SKIP_SAVE"})


CLASSES = (SS4D_PG_settings,)


def register():
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.ss4d = bpy.props.PointerProperty(type=SS4D_PG_settings)


def unregister():
    del bpy.types.Scene.ss4d
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
