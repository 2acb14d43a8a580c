"""Registration accuracy on the synthetic motions with known ground truth (issue 4's bounds: mean
correspondence error <= 1 % of the bounding-box diagonal at every frame, surface distance <= 0.5 %,
>= 99.5 % of faces keep their orientation). Prints one line per motion with the worst frame.

    python bench/registration_accuracy.py [--frames 32] [--noise 0.003] [--rest-share 0.1 0.0 1.0]
        [--kinds capsule_bend:1 capsule_wave:1 ...] [--resolution 0.5] [--textured [--color-noise 0.05]
        [--relight 0.1] [--shading 0.6] [--patches | --unrelated]] [--prior-energy] [--sections]
        [--voxels 64 [--sdf-noise 0.2]] [--vertices 20000] [--amplitude 0.5]

--voxels GRID meshes every frame the way the pipeline meshes decoded frames (`synthetic.mesh_through_decoder`:
signed distances on a GRID^3 voxel grid through the mesh decoder's FlexiCubes extraction and the
pipeline's clean-up) instead of with rings around the axis; --sdf-noise adds noise to those distances (in
grid cells), like a decoder's errors: bumps fixed to the grid that change every frame. --vertices
simplifies the reference frame as the add-on does (default: none).

--textured paints a colour pattern on the material (`synthetic.texture`), so the fit matches colours as
well as shape; --color-noise adds per-vertex noise to every frame's colours (this standard deviation) and
--relight scales each frame's colours by a random gain within ±this, like generated frames' colours.
--shading S bakes Lambert shading under a fixed light into every frame's colours (a share S of the colour),
recomputed from that frame's own normals, as generated colours carry the video's lighting, which changes
as a part turns.
--patches makes the pattern two-tone (sharp edges, flat between); --unrelated replaces every frame's
colours by random ones (no correspondence in them: the fit should score as without colours).

--prior-energy instead asks whether the prior or the optimiser limits the accuracy: for one step from
the middle frame to the last, it compares the graph regulariser's energy of the analytic answer (the
graph state that reproduces it best) with that of the fit, and fits once more starting from the answer.

--sections also prints, for the worst frame, how far the cross-sections of the capsule (slices of the
reference frame across z) have turned about y since the reference frame, in the truth and in the fit
(each the best rigid fit of the slice's points): the waves' gap is a turn the surface cannot see.

--amplitude scales how far every motion goes (`make_sequence`'s amplitude; 1 = the tests' motions), e.g. to
see how the shape-only gaps grow with the waves' slope.

--noise adds Gaussian noise (this fraction of the diagonal) to every vertex of every frame, like
per-frame flicker of generated meshes; the truth stays noise-free, so the reference frame's own
error is about the noise. --rest-share compares settings of the graph regulariser (share of the rest
shape in the shape it keeps; the rest is the previous frame's fit).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ss4d_blender.engine.registration import register_sequence  # noqa: E402
from ss4d_blender.engine.registration.deform import Deformer, FitSettings, Target, best_rotations  # noqa: E402
from ss4d_blender.engine.registration.geometry import vertex_normals  # noqa: E402
from ss4d_blender.testing.synthetic import make_sequence, registration_errors  # noqa: E402
from ss4d_blender.engine.types import Mesh  # noqa: E402

KINDS = ["capsule_bend:1", "capsule_bend:2", "capsule_bend:3", "capsule_twist:1", "capsule_wave:1",
         "capsule_swim:1", "capsule_pulse:1", "cylinder_bend90:1", "sphere_bend:1", "capsule_pair_slide:1"]
RESOLUTION = {"cylinder_bend90": 0.3}     # as in tests/test_registration.py


def prior_energy(kind: str, seed: int, frames: int, resolution: float) -> str:
    """One step, middle frame -> last frame, with the rest shape kept (rest_share 1): regulariser
    energy of the analytic answer vs the fit's, and the fit's error from either start."""
    seq = make_sequence(kind, frames, resolution=resolution, seed=seed)
    ref, last = (frames - 1) // 2, frames - 1                 # the middle frame, as register_sequence picks
    rest = torch.from_numpy(seq.vertices[ref]).double()
    deformer = Deformer(rest, torch.from_numpy(seq.faces[ref].astype(np.int64)), FitSettings(rest_share=1.0))
    g, rows = deformer.graph, deformer.graph_rows
    kept = deformer.kept_edge_vectors(*g.identity_state())
    truth = torch.from_numpy(seq.deform(seq.rest[ref], last))

    def energy(rot, trans):
        return g.regulariser_energy(rot, trans, kept)

    # the graph state that reproduces the analytic answer with the least regulariser energy: a strong
    # point-to-point pull with the regulariser at its own weight, so the nodes the vertices hardly follow
    # (interior ones) sit where the regulariser puts them; a negligible regulariser weight leaves them
    # wherever the pull happened to push them and overstated the answer's energy up to 15x
    state = g.identity_state()
    pull = 1e3 * torch.eye(3, dtype=rest.dtype).expand(rows.shape[0], 3, 3)
    for _ in range(40):
        x = deformer.graph_data.apply(*state)
        state = deformer.graph_data.gauss_newton_step(*state, x, pull, 1e3 * truth[rows], 1.0, kept)
    answer_error = float((g.apply(*state) - truth).norm(dim=1).mean()) / seq.diagonal
    target = Target(torch.from_numpy(seq.vertices[last]).double(),
                    torch.from_numpy(seq.faces[last].astype(np.int64)), 2 * rest.shape[0],
                    torch.Generator().manual_seed(0))
    line = (f"{kind:16s} seed {seed}, frame {ref} -> {last}: analytic answer energy {energy(*state):.3g} "
            f"(graph reproduces it to {answer_error:.2%})")
    for name, start in (("identity", g.identity_state()), ("the answer", state)):
        x, fitted, _ = deformer.fit_coarse_to_fine(start, target)
        error = float((x - truth).norm(dim=1).mean()) / seq.diagonal
        line += f"; fit from {name}: energy {energy(*fitted):.3g}, correspondence {error:.2%}"
    return line


def section_turns(seq, anim, frame: int, slices: int = 6) -> str:
    """Turn about y (degrees) of slices across z of the reference frame's vertices, from the reference
    frame to `frame`: truth -> fit per slice."""
    r = anim.reference_frame
    rest = seq.rest[r]
    start, truth, fit = seq.deform(rest, r), seq.deform(rest, frame), anim.vertices[frame].astype(np.float64)

    def turn(a, b):                         # rotation about y of the best rigid map a -> b
        cov = torch.from_numpy((a - a.mean(0)).T @ (b - b.mean(0)))
        rot = best_rotations(cov[None])[0].numpy()
        return float(np.degrees(np.arctan2(rot[0, 2], rot[0, 0])))

    edges = np.linspace(rest[:, 2].min(), rest[:, 2].max() + 1e-9, slices + 1)
    parts = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (rest[:, 2] >= lo) & (rest[:, 2] < hi)
        parts.append(f"{turn(start[m], truth[m]):+.0f}->{turn(start[m], fit[m]):+.0f}")
    return f"    frame {frame}, slices along z, section turn truth->fit (deg): " + "  ".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--noise", type=float, default=0.0)
    ap.add_argument("--rest-share", type=float, nargs="+", default=[FitSettings().rest_share])
    ap.add_argument("--kinds", nargs="+", default=KINDS, help="kind:seed")
    ap.add_argument("--resolution", type=float, default=None, help="default: as in the tests")
    ap.add_argument("--textured", action="store_true")
    ap.add_argument("--color-noise", type=float, default=0.0)
    ap.add_argument("--relight", type=float, default=0.0)
    ap.add_argument("--shading", type=float, default=0.0)
    ap.add_argument("--patches", action="store_true")
    ap.add_argument("--unrelated", action="store_true")
    ap.add_argument("--prior-energy", action="store_true")
    ap.add_argument("--sections", action="store_true")
    ap.add_argument("--voxels", type=int, default=0, metavar="GRID",
                    help="mesh every frame through the mesh decoder's extraction on a GRID^3 voxel grid")
    ap.add_argument("--sdf-noise", type=float, default=0.0, help="with --voxels: noise on the distances, in cells")
    ap.add_argument("--amplitude", type=float, default=1.0, help="scale of every motion (1: the tests')")
    ap.add_argument("--vertices", type=int, default=10 ** 9, help="simplify the reference to this many vertices")
    args = ap.parse_args()
    if args.prior_energy:
        for item in args.kinds:
            kind, seed = item.split(":")
            print(prior_energy(kind, int(seed), args.frames, args.resolution or RESOLUTION.get(kind, 0.5)),
                  flush=True)
        return 0
    print(f"{args.frames} frames, noise {args.noise:.2%} of the diagonal, "
          + (f"textured{' (two-tone patches)' if args.patches else ''}"
             f"{f' (shading {args.shading})' if args.shading else ''}"
             f"{' (unrelated colours)' if args.unrelated else ''}"
             f" (colour noise {args.color_noise}, relight ±{args.relight:.0%})" if args.textured
             else "shape only") + (f", frames meshed on a {args.voxels}^3 voxel grid (sdf noise {args.sdf_noise} cells)"
                                   if args.voxels else "")
          + (f", motions scaled by {args.amplitude}" if args.amplitude != 1 else "") + "; worst frame of each measure")
    for share in args.rest_share:
        for item in args.kinds:
            kind, seed = item.split(":")
            seq = make_sequence(kind, args.frames, resolution=args.resolution or RESOLUTION.get(kind, 0.5),
                                seed=int(seed), textured=args.textured,
                                meshing="voxels" if args.voxels else "parametric", grid=args.voxels or 64,
                                sdf_noise=args.sdf_noise, amplitude=args.amplitude)
            rng = np.random.default_rng(int(seed) + 2000)
            if args.textured and args.patches:
                seq.colors = [np.where(c > 0.5, 0.8, 0.2).astype(np.float32) for c in seq.colors]
            if args.textured and args.unrelated:
                seq.colors = [rng.uniform(0, 1, c.shape).astype(np.float32) for c in seq.colors]
            if args.textured and args.shading > 0:
                light = np.array([0.3, 0.5, 0.8]) / np.linalg.norm([0.3, 0.5, 0.8])
                for t, (v, f) in enumerate(zip(seq.vertices, seq.faces)):
                    n = vertex_normals(torch.from_numpy(v).double(), torch.from_numpy(f.astype(np.int64))).numpy()
                    shade = 1.0 - args.shading + args.shading * np.clip(n @ light, 0, 1)
                    seq.colors[t] = (seq.colors[t] * shade[:, None]).astype(np.float32)
            if args.textured and (args.color_noise > 0 or args.relight > 0):
                seq.colors = [np.clip(c * rng.uniform(1 - args.relight, 1 + args.relight)
                                      + args.color_noise * rng.normal(size=c.shape), 0, 1).astype(np.float32)
                              for c in seq.colors]
            if args.noise > 0:
                rng = np.random.default_rng(int(seed) + 1000)
                seq.vertices = [(v + args.noise * seq.diagonal * rng.normal(size=v.shape)).astype(np.float32)
                                for v in seq.vertices]
            started = time.perf_counter()
            colors = seq.colors or [None] * len(seq.vertices)
            anim = register_sequence([Mesh(v, f, c) for v, f, c in zip(seq.vertices, seq.faces, colors)],
                                     target_vertices=args.vertices, settings=FitSettings(rest_share=share))
            seconds = time.perf_counter() - started
            corr, surf, flips = registration_errors(seq, anim)
            print(f"rest_share {share:.2f}  {kind:16s} seed {seed}: correspondence {corr.max():.2%} "
                  f"(frame {corr.argmax()}), surface {surf.max():.3%}, flipped {flips.max():.2%}, "
                  f"{anim.vertices.shape[1]} vertices, {seconds:.1f} s", flush=True)
            if args.sections:
                print(section_turns(seq, anim, int(corr.argmax())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
