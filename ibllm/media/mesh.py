"""Triangle meshes (OBJ, OFF, STL) -> a point cloud sampled uniformly over their surface.

3D models usually come as meshes: ModelNet40, the benchmark Point-Bind reports on, ships ``.off`` files, CAD
tools and 3D printers write ``.stl``, ShapeNet and most exporters ``.obj``. A mesh's vertices alone are a poor
cloud (a cube has eight), so the surface is sampled instead: ``MESH_SAMPLES`` points, each on a triangle drawn
with probability proportional to its area, at a uniformly random place on it, as ModelNet40's resampled clouds
(10,000 points) were made. The generator is seeded, so the same file always gives the same cloud. Polygons of more
than three corners are split into a fan of triangles.

Parsed in numpy, like ``pointio``: only declared, bounds-checked ranges are read; face indices are checked against
the vertex count before they index anything.
"""

from __future__ import annotations

import io
import re
import struct
from pathlib import Path

import numpy as np

from ibllm.media.errors import MediaError
from ibllm.media.limits import Limits
from ibllm.media.pointio import read_obj

MESH_EXTENSIONS = (".obj", ".off", ".stl")
MESH_SAMPLES = 10_000
MESH_SEED = 0
_STL_RECORD = np.dtype([("normal", "<f4", 3), ("corners", "<f4", (3, 3)), ("attribute", "<u2")])  # 50 bytes


def is_binary_stl(head: bytes, size: int) -> bool:
    """A binary STL has no magic (its 80-byte header is free text, often "solid ..."); what gives it away is its
    size: the header, a triangle count, and 50 bytes per triangle."""
    return len(head) >= 84 and size == 84 + 50 * struct.unpack_from("<I", head, 80)[0]


def _check_faces(name: str, count: int, limits: Limits) -> None:
    if count > limits.max_points:
        raise MediaError(f"{name} has {count:,} faces; the limit is {limits.max_points:,}. Simplify the mesh first.")


def sample_surface(triangles: np.ndarray, name: str, count: int = MESH_SAMPLES, seed: int = MESH_SEED) -> np.ndarray:
    """(T, 3, 3) triangle corners -> (count, 3) float64 points uniformly distributed over their total area."""
    if triangles.shape[0] == 0:
        raise MediaError(f"{name}: the mesh has no faces")
    if not np.isfinite(triangles).all():
        raise MediaError(f"{name}: the mesh has NaN or infinite vertex coordinates; clean it and upload again")
    a, b, c = triangles[:, 0], triangles[:, 1], triangles[:, 2]
    with np.errstate(over="ignore", invalid="ignore"):
        areas = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    total = float(areas.sum())
    if not (np.isfinite(total) and total > 0):
        raise MediaError(f"{name}: the mesh's faces have no area (every triangle is flat or its coordinates are "
                         "too large); upload its vertices as a point cloud instead")
    rng = np.random.default_rng(seed)
    picked = rng.choice(triangles.shape[0], size=count, p=areas / total)
    # A uniform point of a triangle: corners weighted (1 - sqrt(u), sqrt(u) (1 - v), sqrt(u) v).
    u, v = np.sqrt(rng.random(count))[:, None], rng.random(count)[:, None]
    return (1 - u) * a[picked] + u * (1 - v) * b[picked] + u * v * c[picked]


# ----------------------------------------------------------------------------------------------------------
# STL


def read_stl(path: Path, limits: Limits) -> np.ndarray:
    """(T, 3, 3) float64 triangle corners of a binary or ASCII STL."""
    name = path.name
    data = path.read_bytes()
    if is_binary_stl(data[:84], len(data)):
        count = struct.unpack_from("<I", data, 80)[0]
        _check_faces(name, count, limits)
        records = np.frombuffer(data, dtype=_STL_RECORD, count=count, offset=84)
        return records["corners"].astype(np.float64)
    if len(data) >= 84 and b"\x00" in data[:4096]:  # binary, but not the size its triangle count says
        count = struct.unpack_from("<I", data, 80)[0]
        raise MediaError(f"{name}: a binary STL declares {count:,} triangles ({84 + 50 * count:,} bytes) but the "
                         f"file holds {len(data):,} bytes (damaged or cut short?)")
    if not data.lstrip()[:5].lower() == b"solid":
        raise MediaError(f"{name}: not an STL file (a binary STL is 84 bytes + 50 per triangle, which this file's "
                         "size does not match; an ASCII STL starts with 'solid')")
    _check_faces(name, data.count(b"facet"), limits)
    rows = re.findall(rb"vertex[ \t]+(\S+)[ \t]+(\S+)[ \t]+(\S+)", data)
    if len(rows) % 3:
        raise MediaError(f"{name}: the STL has {len(rows)} vertex lines, not three per facet (damaged or cut short?)")
    try:
        return np.array(rows, dtype=np.float64).reshape(-1, 3, 3)
    except ValueError:
        raise MediaError(f"{name}: non-numeric vertex coordinates in the STL file") from None


# ----------------------------------------------------------------------------------------------------------
# OFF


def _off_counts(lines: list[bytes], name: str) -> tuple[int, int, int]:
    """(vertex count, face count, index of the first vertex line) from the header: "OFF" (or COFF, NOFF, ...)
    then "V F E", which ModelNet40 sometimes writes on the magic's own line ("OFF490 518 0")."""
    first = lines[0].strip() if lines else b""
    match = re.match(rb"^([A-Z]*OFF)\s*(.*)$", first)
    if not match:
        raise MediaError(f"{name}: not an OFF mesh (its first line should be 'OFF')")
    if b"BINARY" in match.group(2).upper():
        raise MediaError(f"{name}: binary OFF is not supported; save the mesh as ASCII OFF, STL or PLY")
    rest, start = match.group(2), 1
    if not rest.split():
        rest, start = (lines[1], 2) if len(lines) > 1 else (b"", 1)
    try:
        numbers = [int(t) for t in rest.split()[:3]]
        vertices, faces = numbers[0], numbers[1]
    except (ValueError, IndexError):
        raise MediaError(f"{name}: the OFF header needs the vertex, face and edge counts") from None
    if vertices < 1 or faces < 0:
        raise MediaError(f"{name}: the OFF header declares {vertices} vertices and {faces} faces")
    return vertices, faces, start


def _parse(block: bytes, columns: tuple[int, ...], dtype: type) -> np.ndarray:
    """The ``columns`` of number lines, parsed by numpy in C (a Python list per line of a large mesh would take
    gigabytes); ValueError when a line lacks one."""
    return np.loadtxt(io.BytesIO(block), dtype=dtype, usecols=columns, ndmin=2, comments=None, encoding="latin-1")


def _off_faces(block: bytes, name: str) -> np.ndarray:
    """(F', 3) vertex indices of the face lines, polygons fanned into triangles."""
    if not block:
        return np.zeros((0, 3), dtype=np.int64)
    try:
        head = _parse(block, (0, 1, 2, 3), np.int64)
        if (head[:, 0] == 3).all():  # the common case: every face a triangle
            return head[:, 1:]
    except ValueError:
        pass  # a face of another corner count, or a malformed line: read line by line below
    fans = []
    for line in block.splitlines():
        try:
            face = [int(t) for t in line.split()]
        except ValueError:
            raise MediaError(f"{name}: malformed OFF face line (whole numbers needed): {line[:60]!r}") from None
        corners = face[1:1 + face[0]] if face and face[0] >= 3 else []
        if len(corners) < 3 or len(corners) != face[0]:
            raise MediaError(f"{name}: a face line needs its corner count (3 or more) and that many vertex indices")
        fans.extend((corners[0], corners[i], corners[i + 1]) for i in range(1, len(corners) - 1))
    return np.array(fans, dtype=np.int64).reshape(-1, 3)


def read_off(path: Path, limits: Limits) -> tuple[np.ndarray, np.ndarray]:
    """(V, 3) float64 vertices and (F, 3) triangle vertex indices of an ASCII OFF mesh."""
    name = path.name
    data = path.read_bytes()
    if b"#" in data:
        data = re.sub(rb"#[^\n]*", b"", data)
    data = re.sub(rb"(?m)^[ \t\r]*(?:\n|\Z)", b"", data)  # blank lines
    starts = np.concatenate([[0], np.flatnonzero(np.frombuffer(data, np.uint8) == 10) + 1])
    starts = np.append(starts[starts < len(data)], len(data))  # line i is data[starts[i]:starts[i + 1]]
    lines = len(starts) - 1
    n_vertices, n_faces, start = _off_counts([data[starts[i]:starts[i + 1]] for i in range(min(lines, 2))], name)
    _check_faces(name, n_faces, limits)
    if n_vertices > limits.max_points:
        raise MediaError(f"{name} has {n_vertices:,} vertices; the limit is {limits.max_points:,}")
    if lines < start + n_vertices + n_faces:
        raise MediaError(f"{name}: the file is truncated (its header declares {n_vertices:,} vertices and "
                         f"{n_faces:,} faces; {lines - start:,} lines follow)")
    face_start, end = start + n_vertices, start + n_vertices + n_faces
    try:
        vertices = _parse(data[starts[start]:starts[face_start]], (0, 1, 2), np.float64)
    except ValueError:
        raise MediaError(f"{name}: malformed OFF vertex lines (each needs x, y and z)") from None
    faces = _off_faces(data[starts[face_start]:starts[end]], name)
    if faces.size and (faces.min() < 0 or faces.max() >= n_vertices):
        raise MediaError(f"{name}: a face refers to a vertex that does not exist (indices run 0..{n_vertices - 1})")
    return vertices, faces


# ----------------------------------------------------------------------------------------------------------
# OBJ


def read_obj_faces(path: Path, n_vertices: int, limits: Limits) -> np.ndarray:
    """(F, 3) zero-based triangle vertex indices of an OBJ's ``f`` lines ("f 1 2 3", "f 1/4/2 ...", "f 1//2 ...";
    negative indices count back from the vertices defined before the line), polygons fanned into triangles."""
    name = path.name
    data = path.read_bytes()
    lines = list(re.finditer(rb"^[ \t]*f[ \t]+([^\n]*)", data, re.M))
    _check_faces(name, len(lines), limits)
    before = None  # offsets of the vertex lines, found only when a relative index needs them
    fans: list[tuple[int, int, int]] = []
    for line in lines:
        try:
            corners = [int(token.split(b"/")[0]) for token in line.group(1).split()]
        except ValueError:
            raise MediaError(f"{name}: malformed OBJ face line: {line.group(0)[:60]!r}") from None
        if len(corners) < 3:
            raise MediaError(f"{name}: an OBJ face needs 3 or more vertices: {line.group(0)[:60]!r}")
        if any(c < 0 for c in corners):
            if before is None:
                before = np.array([m.start() for m in re.finditer(rb"^[ \t]*v[ \t]", data, re.M)])
            defined = int(np.searchsorted(before, line.start()))
            corners = [c + defined + 1 if c < 0 else c for c in corners]
        fans.extend((corners[0] - 1, corners[i] - 1, corners[i + 1] - 1) for i in range(1, len(corners) - 1))
    index = np.array(fans, dtype=np.int64).reshape(-1, 3)
    if index.size and (index.min() < 0 or index.max() >= n_vertices):
        raise MediaError(f"{name}: a face refers to a vertex that does not exist (the file has {n_vertices:,})")
    return index


def read_mesh_points(path: Path, limits: Limits) -> np.ndarray:
    """(M, 3) float64 points of an OFF, OBJ or STL mesh: its surface sampled (``sample_surface``), or the
    vertices of an OFF or OBJ that has no faces (a point set saved as a mesh)."""
    ext = path.suffix.lower()
    if ext == ".stl":
        return sample_surface(read_stl(path, limits), path.name)
    if ext == ".obj":
        vertices = read_obj(path, limits)
        faces = read_obj_faces(path, len(vertices), limits)
    else:
        vertices, faces = read_off(path, limits)
    return vertices if faces.size == 0 else sample_surface(vertices[faces], path.name)


__all__ = ["MESH_SAMPLES", "MESH_EXTENSIONS", "is_binary_stl", "read_mesh_points", "read_off", "read_stl",
           "sample_surface"]
