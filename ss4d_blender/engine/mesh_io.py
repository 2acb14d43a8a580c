"""Triangle meshes as `.ply` files (numpy only): what the engine command line writes per frame.

The file is a standard polygon PLY: `vertex` (x y z float, and red green blue uchar when the mesh has
colours) and `face` (list uchar int vertex_indices). `Mesh.colors` are linear 0..1; PLY viewers show
8-bit vertex colours as sRGB, so they are written sRGB-encoded and read back to linear.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

from .types import Mesh


def linear_to_srgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.clip(rgb, 0.0, 1.0)
    return np.where(rgb <= 0.0031308, rgb * 12.92, 1.055 * np.power(rgb, 1 / 2.4) - 0.055)


def srgb_to_linear(rgb: np.ndarray) -> np.ndarray:
    rgb = np.clip(rgb, 0.0, 1.0)
    return np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)


def save_mesh_ply(path: Union[str, Path], mesh: Mesh, binary: bool = True) -> Path:
    """Writes `mesh` (vertices [V,3], faces [F,3], optional linear colours [V,3]) as PLY."""
    path = Path(path)
    vertices = np.asarray(mesh.vertices, np.float32).reshape(-1, 3)
    faces = np.asarray(mesh.faces, np.int64).reshape(-1, 3)
    if faces.size and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise ValueError(f"face indices out of range for {len(vertices)} vertices")
    colors = None
    if mesh.colors is not None:
        colors = np.round(linear_to_srgb(np.asarray(mesh.colors, np.float64).reshape(-1, 3)) * 255).astype(np.uint8)
    header = ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0",
              "comment SS4D for Blender", f"element vertex {len(vertices)}",
              "property float x", "property float y", "property float z"]
    if colors is not None:
        header += ["property uchar red", "property uchar green", "property uchar blue"]
    header += [f"element face {len(faces)}", "property list uchar int vertex_indices", "end_header"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        if binary:
            vdtype = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
            if colors is not None:
                vdtype += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
            table = np.empty(len(vertices), dtype=vdtype)
            table["x"], table["y"], table["z"] = vertices.T
            if colors is not None:
                table["red"], table["green"], table["blue"] = colors.T
            f.write(table.tobytes())
            ftable = np.empty(len(faces), dtype=[("n", "u1"), ("v", "<i4", (3,))])
            ftable["n"] = 3
            ftable["v"] = faces
            f.write(ftable.tobytes())
        else:
            lines = []
            for i, v in enumerate(vertices):
                row = " ".join(repr(float(c)) for c in v)
                if colors is not None:
                    row += " " + " ".join(str(int(c)) for c in colors[i])
                lines.append(row)
            lines += [f"3 {a} {b} {c}" for a, b, c in faces]
            f.write(("\n".join(lines) + "\n").encode("ascii"))
    return path


def load_mesh_ply(path: Union[str, Path]) -> Mesh:
    """Reads a triangle PLY written by `save_mesh_ply` (binary little endian or ascii, triangles only)."""
    path = Path(path)
    data = path.read_bytes()
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise ValueError(f"{path}: not a PLY file")
    body = data.index(b"\n", end) + 1
    fmt, counts, props, element = None, {}, {"vertex": [], "face": []}, None
    for line in data[:body].decode("ascii").splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "format":
            fmt = words[1]
        elif words[0] == "element":
            element = words[1]
            counts[element] = int(words[2])
        elif words[0] == "property" and element == "vertex":
            props["vertex"].append((words[2], {"float": "<f4", "uchar": "u1", "double": "<f8"}[words[1]]))
    nv, nf = counts.get("vertex", 0), counts.get("face", 0)
    names = [n for n, _ in props["vertex"]]
    if fmt == "ascii":
        rows = data[body:].decode("ascii").split("\n")
        vtab = np.array([r.split() for r in rows[:nv]], dtype=np.float64).reshape(nv, len(names))
        table = {n: vtab[:, i] for i, n in enumerate(names)}
        faces = np.array([r.split()[1:4] for r in rows[nv:nv + nf]], dtype=np.int32).reshape(nf, 3)
    elif fmt == "binary_little_endian":
        vtable = np.frombuffer(data, dtype=np.dtype(props["vertex"]), count=nv, offset=body)
        table = {n: vtable[n] for n in names}
        offset = body + vtable.nbytes
        ftable = np.frombuffer(data, dtype=[("n", "u1"), ("v", "<i4", (3,))], count=nf, offset=offset)
        if nf and (ftable["n"] != 3).any():
            raise ValueError(f"{path}: only triangle faces are supported")
        faces = ftable["v"].astype(np.int32)
    else:
        raise ValueError(f"{path}: unsupported PLY format {fmt!r}")
    vertices = np.stack([table["x"], table["y"], table["z"]], axis=1).astype(np.float32)
    colors = None
    if "red" in table:
        srgb = np.stack([table["red"], table["green"], table["blue"]], axis=1).astype(np.float64) / 255
        colors = srgb_to_linear(srgb).astype(np.float32)
    return Mesh(vertices, faces, colors)
