"""Helpers of the add-on tests (need the `bpy` module): image strips and a stand-in UI layout."""
from pathlib import Path
from types import SimpleNamespace


def add_images(scene, source, name="seq"):
    """An image strip at frame 1, channel 1, made the active strip, with the render size of its images.
    `source`: a folder of PNGs (in name order) or a list of image files of one folder."""
    files = sorted(Path(source).glob("*.png")) if isinstance(source, (str, Path)) else list(source)
    editor = scene.sequence_editor_create()
    strip = editor.strips.new_image(name, str(files[0]), channel=1, frame_start=1)
    for f in files[1:]:
        strip.elements.append(f.name)
    editor.active_strip = strip
    scene.render.resolution_x, scene.render.resolution_y = strip.elements[0].orig_width, strip.elements[0].orig_height
    return strip


class RecordingLayout:
    """Stands in for a UI layout: records the labels, operators and properties a panel draws."""

    def __init__(self):
        self.labels, self.operators, self.props = [], [], []

    def label(self, text="", icon="NONE"):
        self.labels.append((text, icon))

    def operator(self, idname, **_):
        self.operators.append(idname)
        return SimpleNamespace()  # the operator's properties, which a draw may set

    def progress(self, **_):
        pass

    def prop(self, data, name, **_):
        self.props.append(name)

    def box(self, **_):
        return self

    column = row = box
