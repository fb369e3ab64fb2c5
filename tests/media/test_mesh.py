"""Meshes (OFF, STL): sampled over their surface, the same cloud from every format of one mesh, and damaged or
hostile files refused with a reason."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from ibllm.media.detect import detect_modality
from ibllm.media.errors import MediaError
from ibllm.media.mesh import MESH_SAMPLES
from ibllm.media.point import load_point, read_points

# A box 2 x 1 x 0.5 with quad faces: its surface is known exactly, its eight vertices are a poor cloud.
SIZE = np.array([2.0, 1.0, 0.5])
CORNERS = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], float) * SIZE
QUADS = [[0, 1, 3, 2], [4, 6, 7, 5], [0, 4, 5, 1], [2, 3, 7, 6], [0, 2, 6, 4], [1, 5, 7, 3]]
TRIANGLES = np.array([CORNERS[[q[0], q[i], q[i + 1]]] for q in QUADS for i in (1, 2)])


def _off(header: str = "OFF\n8 6 0\n") -> str:
    return (header + "# the corners\n" + "".join(f"{x} {y} {z}\n" for x, y, z in CORNERS)
            + "".join(f"4 {' '.join(map(str, q))}\n" for q in QUADS))


def _obj(relative: bool = False) -> str:
    """The box as OBJ: "v/vt/vn" face corners, or corners counted back from the last vertex (-8 .. -1)."""
    corners = "".join(f"v {x} {y} {z}\n" for x, y, z in CORNERS)
    if relative:
        return "o box\n" + corners + "".join("f " + " ".join(str(i - 8) for i in q) + "\n" for q in QUADS)
    return ("mtllib box.mtl\n" + corners + "vt 0 0\nvn 0 0 1\n"
            + "".join("f " + " ".join(f"{i + 1}/1/1" for i in q) + "\n" for q in QUADS))


def _binary_stl(triangles: np.ndarray) -> bytes:
    records = b"".join(bytes(12) + t.astype("<f4").tobytes() + bytes(2) for t in triangles)
    return b"solid but binary".ljust(80) + struct.pack("<I", len(triangles)) + records


def _ascii_stl(triangles: np.ndarray) -> str:
    facets = "".join("facet normal 0 0 0\n outer loop\n" + "".join(f"  vertex {x} {y} {z}\n" for x, y, z in t)
                     + " endloop\nendfacet\n" for t in triangles)
    return f"solid box\n{facets}endsolid box\n"


@pytest.fixture
def box_files(tmp_path):
    (tmp_path / "box.off").write_text(_off())
    (tmp_path / "glued.off").write_text(_off("OFF8 6 0\n"))  # as some ModelNet40 files write it
    (tmp_path / "box.stl").write_bytes(_binary_stl(TRIANGLES))
    (tmp_path / "ascii.stl").write_text(_ascii_stl(TRIANGLES))
    (tmp_path / "box.obj").write_text(_obj())
    (tmp_path / "relative.obj").write_text(_obj(relative=True))
    return tmp_path


def test_a_mesh_is_sampled_uniformly_over_its_surface(box_files):
    for name in ("box.off", "glued.off", "box.stl", "ascii.stl", "box.obj", "relative.obj"):
        path = box_files / name
        assert detect_modality(path) == "point"
        xyz = read_points(path)
        assert xyz.shape == (MESH_SAMPLES, 3)
        # On the surface: every point on one of the six faces of the box.
        on_face = np.isclose(xyz, 0, atol=1e-5) | np.isclose(xyz, SIZE, atol=1e-5)
        assert on_face.any(axis=1).all(), name
        # Uniform over the area: each pair of opposite faces holds its share (2x1: 4/7, 2x0.5: 2/7, 1x0.5: 1/7).
        share = [np.mean(on_face[:, axis]) for axis in (2, 1, 0)]
        np.testing.assert_allclose(share, [4 / 7, 2 / 7, 1 / 7], atol=0.03)
    same = read_points(box_files / "box.off")
    # One mesh, one cloud, whatever the format.
    for name in ("glued.off", "box.stl", "ascii.stl", "box.obj", "relative.obj"):
        np.testing.assert_allclose(read_points(box_files / name), same, atol=1e-6)
    assert np.array_equal(load_point(box_files / "box.stl"), load_point(box_files / "box.stl"))  # seeded


def test_an_off_without_faces_is_its_vertices(tmp_path):
    (tmp_path / "points.off").write_text("OFF\n8 0 0\n" + "".join(f"{x} {y} {z}\n" for x, y, z in CORNERS))
    np.testing.assert_array_equal(read_points(tmp_path / "points.off"), CORNERS)


@pytest.mark.parametrize("name, content, message", [
    ("short.off", _off()[: len(_off()) // 2], "truncated"),
    ("index.off", _off().replace("4 0 1 3 2", "4 0 1 3 99"), "vertex that does not exist"),
    ("negative.off", _off().replace("4 0 1 3 2", "4 0 -1 3 2"), "vertex that does not exist"),
    ("corners.off", _off().replace("4 0 1 3 2", "4 0 1 3"), "corner count"),
    ("counts.off", "OFF\nmany faces\n", "counts"),
    ("binary.off", "OFF BINARY\n8 6 0\n", "binary OFF"),
    ("nan.off", _off().replace("0.0 0.0 0.0", "nan 0.0 0.0", 1), "NaN"),
    ("flat.off", "OFF\n3 1 0\n0 0 0\n1 1 1\n2 2 2\n3 0 1 2\n", "no area"),
    ("notstl.stl", "this is not a mesh\n", "not an STL"),
    ("index.obj", _obj().replace("f 1/1/1", "f 9/1/1"), "vertex that does not exist"),
    ("before.obj", "f -1 -2 -3\n" + _obj(), "vertex that does not exist"),  # counted back from no vertex
    ("line.obj", _obj() + "f 1 2\n", "3 or more"),
    ("words.obj", _obj() + "f one two three\n", "malformed OBJ face"),
    ("cut.stl", _ascii_stl(TRIANGLES)[:400], "three per facet"),
])
def test_damaged_meshes_are_refused_with_a_reason(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(MediaError, match=message):
        load_point(tmp_path / name)


def test_a_binary_stl_cut_short_or_lying_about_its_count_is_not_read(tmp_path):
    blob = _binary_stl(TRIANGLES)
    (tmp_path / "cut.stl").write_bytes(blob[:-20])
    (tmp_path / "lying.stl").write_bytes(blob[:80] + struct.pack("<I", 10_000_000) + blob[84:])
    for name in ("cut.stl", "lying.stl"):
        with pytest.raises(MediaError, match=f"{name}: a binary STL declares .* triangles"):
            load_point(tmp_path / name)
