"""Point-cloud file parsers that return the (N, 3) float64 xyz of the points, in numpy, nothing else (and the one
PLY writer, ``write_ply``).

Written in Python/numpy on purpose: uploaded files are untrusted, and a parser that only ever reads declared,
bounds-checked byte ranges into typed arrays cannot be made to run code or to allocate more than the file
holds. Colours, normals and other properties are ignored. Formats:

- PLY: ascii, binary_little_endian, binary_big_endian; the ``vertex`` element's x, y, z, whatever other
  properties it has and wherever it sits among the other elements (faces, edges, ...).
- PCD: ascii and binary (``binary_compressed`` is refused with a message saying what to do).
- XYZ / PTS / TXT / CSV: the first three numeric columns of a table (comma, semicolon, tab or space
  separated); header lines and a leading point-count line are skipped.
- OBJ: the ``v x y z`` lines only.
- NPY / NPZ: a float/int array of shape (N, >=3), read by ``ibllm.media.arrays`` (the header is checked before
  loading and pickles are never allowed).
"""

from __future__ import annotations

import io
import re
import struct
from collections import Counter
from pathlib import Path

import numpy as np

from ibllm.media.arrays import array_header, read_array
from ibllm.media.errors import MediaError
from ibllm.media.limits import Limits

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2", "ushort": "u2",
    "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4", "float": "f4", "float32": "f4",
    "double": "f8", "float64": "f8",
}
_MAX_HEADER = 64 * 1024
_MAX_WALKED = 200_000  # PLY list items walked one at a time (~20 us each) when their lengths vary


def _check_count(name: str, count: int, limits: Limits) -> None:
    if count > limits.max_points:
        raise MediaError(f"{name} has {count:,} points; the limit is {limits.max_points:,}. Downsample it first.")


def _numeric_lines(text: bytes, name: str, what: str, columns: list[int], rows: int | None = None) -> np.ndarray:
    """The ``columns`` of whitespace-separated number lines (at most ``rows``), parsed by numpy in C: a Python
    list of every token of a 200 MB file would take gigabytes."""
    try:
        return np.loadtxt(io.BytesIO(text), dtype=np.float64, usecols=columns, max_rows=rows, ndmin=2,
                          comments=None, encoding="latin-1")
    except (ValueError, IndexError):
        lines = text.count(b"\n") + 1
        if rows is not None and not text.endswith(b"\n") and lines < rows:  # cut short inside a line
            raise MediaError(f"{name}: the file is truncated (it ends inside point {lines:,} of the {rows:,} its "
                             "header declares)") from None
        raise MediaError(f"{name}: malformed {what} (every line needs the header's numbers)") from None


def _line_starts(data: bytes) -> np.ndarray:
    """Byte offsets where each line of ``data`` starts (vectorised: no list of lines)."""
    return np.concatenate([[0], np.flatnonzero(np.frombuffer(data, np.uint8) == 10) + 1])


def _unique_names(name: str, names: list[str], what: str) -> None:
    repeated = sorted(n for n, k in Counter(names).items() if k > 1)
    if repeated:
        raise MediaError(f"{name}: the {what} names {', '.join(repeated)} more than once")


def _header_lines(data: bytes, name: str, end_marker: bytes | None) -> tuple[list[str], int]:
    """Text header lines and the byte offset right after the header."""
    lines, pos = [], 0
    while pos < min(len(data), _MAX_HEADER):
        nl = data.find(b"\n", pos)
        if nl < 0:
            nl = len(data)
        line = data[pos:nl].decode("ascii", errors="replace").strip()
        pos = nl + 1
        lines.append(line)
        if end_marker is not None and line.encode() == end_marker:
            return lines, pos
        if end_marker is None and line.upper().startswith("DATA"):
            return lines, pos
    raise MediaError(f"{name}: the header never ends (truncated or not a point cloud file)")


# ----------------------------------------------------------------------------------------------------------
# PLY


def read_ply(path: Path, limits: Limits) -> np.ndarray:
    name = path.name
    data = path.read_bytes()
    lines, body = _header_lines(data, name, b"end_header")
    fmt = None
    elements: list[tuple[str, int, list[tuple[str, str, str | None]]]] = []  # name, count, [(prop, type, list-count)]
    for line in lines[1:]:
        parts = line.split()
        if not parts or parts[0] in ("comment", "obj_info", "end_header"):
            continue
        try:
            if parts[0] == "format":
                fmt = parts[1]
            elif parts[0] == "element":
                elements.append((parts[1], int(parts[2]), []))
            elif parts[0] == "property" and elements:
                if parts[1] == "list":
                    elements[-1][2].append((parts[4], _PLY_TYPES[parts[3]], _PLY_TYPES[parts[2]]))
                else:
                    elements[-1][2].append((parts[2], _PLY_TYPES[parts[1]], None))
        except (IndexError, KeyError, ValueError):
            raise MediaError(f"{name}: malformed PLY header line {line!r}") from None
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise MediaError(f"{name}: unsupported PLY format {fmt!r} (ascii or binary little/big endian expected)")
    if any(count < 0 for _, count, _ in elements):
        raise MediaError(f"{name}: negative element count in the PLY header")
    for el_name, _, props in elements:
        _unique_names(name, [p[0] for p in props], f"PLY {el_name} element")
    vertex = next((e for e in elements if e[0] == "vertex"), None)
    if vertex is None:
        raise MediaError(f"{name}: the PLY file has no 'vertex' element")
    names = [p[0] for p in vertex[2]]
    if not all(axis in names for axis in ("x", "y", "z")):
        raise MediaError(f"{name}: the PLY vertex element has no x, y, z properties")
    _check_count(name, vertex[1], limits)
    if fmt == "ascii":
        return _ply_ascii(data[body:], elements, name)
    return _ply_binary(data, body, elements, "<" if fmt == "binary_little_endian" else ">", name)


def write_ply(path: str | Path, points: np.ndarray, colours: np.ndarray | None = None) -> Path:
    """Write a binary little-endian point-only PLY: float x, y, z (what open3d, ``gr.Model3D`` and every
    point-cloud viewer read), plus uchar red, green, blue when ``colours`` (N, 3) is given. ``read_ply`` reads it."""
    points = np.asarray(points, dtype="<f4").reshape(-1, 3)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(points)}",
              "property float x", "property float y", "property float z"]
    if colours is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
        header += ["property uchar red", "property uchar green", "property uchar blue"]
    rec = np.empty(len(points), dtype=fields)
    rec["x"], rec["y"], rec["z"] = points[:, 0], points[:, 1], points[:, 2]
    if colours is not None:
        colours = np.asarray(colours, dtype=np.uint8).reshape(-1, 3)
        rec["red"], rec["green"], rec["blue"] = colours[:, 0], colours[:, 1], colours[:, 2]
    header.append("end_header")
    path = Path(path)
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(rec.tobytes())
    return path


def _ply_ascii(body: bytes, elements, name: str) -> np.ndarray:
    starts = _line_starts(body)
    pos = 0
    for el_name, count, props in elements:
        if el_name != "vertex":
            pos += count  # one line per item in ascii PLY, whatever its lists hold
            continue
        if any(lc is not None for _, _, lc in props):
            raise MediaError(f"{name}: list properties inside the PLY vertex element are not supported")
        if count == 0:
            return np.zeros((0, 3))
        available = max(len(starts) - pos, 0)
        if available < count or (available == count and not body[starts[-1]:].strip()):
            raise MediaError(f"{name}: the PLY file is truncated (fewer lines than its {count} vertices need)")
        end = starts[pos + count] if pos + count < len(starts) else len(body)
        cols = [next(i for i, p in enumerate(props) if p[0] == axis) for axis in ("x", "y", "z")]
        table = _numeric_lines(body[starts[pos]:end], name, "vertex lines in the ascii PLY data", cols)
        if table.shape[0] != count:
            raise MediaError(f"{name}: the PLY file is truncated ({table.shape[0]} of {count} vertices)")
        return table
    raise AssertionError("unreachable: vertex element checked above")


def _ply_binary(data: bytes, offset: int, elements, order: str, name: str) -> np.ndarray:
    for el_name, count, props in elements:
        has_lists = any(lc is not None for _, _, lc in props)
        if el_name == "vertex":
            if has_lists:
                raise MediaError(f"{name}: list properties inside the PLY vertex element are not supported")
            dtype = np.dtype([(p, order + t) for p, t, _ in props])
            if offset + dtype.itemsize * count > len(data):
                raise MediaError(f"{name}: the PLY file is truncated (fewer bytes than its {count} vertices need)")
            rec = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
            with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf are reported by the caller
                return np.stack([rec[a].astype(np.float64) for a in ("x", "y", "z")], axis=1)
        if not has_lists:
            offset += np.dtype([(p, order + t) for p, t, _ in props]).itemsize * count
            continue
        offset = _skip_list_element(data, offset, count, props, order, name)
    raise AssertionError("unreachable: vertex element checked above")


def _skip_list_element(data: bytes, offset: int, count: int, props, order: str, name: str) -> int:
    """The offset after an element with list properties (faces before the vertices: rare). Items that all
    have the first item's list lengths (a triangle mesh) are checked and skipped at once; others are walked
    one by one, at most _MAX_WALKED of them."""
    least = sum(np.dtype(t if lc is None else lc).itemsize for _, t, lc in props)
    if offset + least * count > len(data):
        raise MediaError(f"{name}: the PLY file is truncated (fewer bytes than its {count:,} items need)")
    if not count:
        return offset
    lists: list[tuple[int, str, int]] = []  # the first item's lists: (offset in the item, count type, length)
    stride = _item_end(data, offset, props, order, name, lists) - offset
    if stride > 0 and offset + stride * count <= len(data):
        items = np.frombuffer(data, dtype=np.uint8, count=stride * count, offset=offset).reshape(count, stride)
        if all((items[:, at:at + np.dtype(lc).itemsize].copy().view(lc)[:, 0] == n).all() for at, lc, n in lists):
            return offset + stride * count
    if count > _MAX_WALKED:
        raise MediaError(f"{name}: {count:,} PLY items of varying length come before the vertices; write the "
                         "vertex element first and upload it again")
    for _ in range(count):
        offset = _item_end(data, offset, props, order, name)
    return offset


def _item_end(data: bytes, offset: int, props, order: str, name: str,
              lists: list[tuple[int, str, int]] | None = None) -> int:
    """The offset after one PLY item at ``offset`` (bounds-checked); its lists' layout goes into ``lists``."""
    pos = offset
    for _, t, lc in props:
        if lc is None:
            pos += np.dtype(t).itemsize
            continue
        if pos + np.dtype(lc).itemsize > len(data):
            raise MediaError(f"{name}: the PLY file is truncated")
        n = int(np.frombuffer(data, dtype=order + lc, count=1, offset=pos)[0])
        if lists is not None:
            lists.append((pos - offset, order + lc, n))
        pos += np.dtype(lc).itemsize + max(n, 0) * np.dtype(t).itemsize
    if pos > len(data):
        raise MediaError(f"{name}: the PLY file is truncated")
    return pos


# ----------------------------------------------------------------------------------------------------------
# PCD


def read_pcd(path: Path, limits: Limits) -> np.ndarray:
    name = path.name
    data = path.read_bytes()
    lines, body = _header_lines(data, name, None)
    head: dict[str, list[str]] = {}
    for line in lines:
        parts = line.split()
        if parts and not parts[0].startswith("#"):
            head[parts[0].upper()] = parts[1:]
    try:
        fields = head["FIELDS"]
        sizes = [int(s) for s in head.get("SIZE", ["4"] * len(fields))]
        types = head.get("TYPE", ["F"] * len(fields))
        counts = [int(c) for c in head.get("COUNT", ["1"] * len(fields))]
        points = int(head["POINTS"][0]) if "POINTS" in head else int(head["WIDTH"][0]) * int(head["HEIGHT"][0])
        mode = head["DATA"][0].lower()
    except (KeyError, IndexError, ValueError):
        raise MediaError(f"{name}: malformed PCD header (FIELDS, SIZE, TYPE, COUNT, POINTS, DATA expected)") from None
    if not (len(fields) == len(sizes) == len(types) == len(counts)) or not all(a in fields for a in "xyz"):
        raise MediaError(f"{name}: the PCD header has no consistent x, y, z fields")
    _unique_names(name, fields, "PCD header's FIELDS")
    if points < 0 or any(c < 1 for c in counts):
        raise MediaError(f"{name}: malformed PCD header (negative point count or field COUNT)")
    _check_count(name, points, limits)
    if mode == "binary_compressed":
        # LZF-compressed, field-major: decoded by open3d in a child process (its reader is not ours to harden).
        # The header's count was checked above; the decompressed size must also fit the file-size limit.
        from ibllm.media.open3d_reader import read_points_isolated

        _check_compressed_block(data, body, points * sum(s * c for s, c in zip(sizes, counts, strict=True)), name)
        return read_points_isolated(path)
    columns, col = {}, 0
    for f, c in zip(fields, counts, strict=True):
        columns[f] = col
        col += c
    idx = [columns[a] for a in ("x", "y", "z")]
    if mode == "ascii":
        table = _numeric_lines(data[body:], name, "ascii PCD data", idx, rows=points) if points else \
            np.zeros((0, 3))
        if table.shape[0] < points:
            raise MediaError(f"{name}: the PCD file is truncated ({table.shape[0]} of its {points} points)")
        return table
    if mode != "binary":
        raise MediaError(f"{name}: unknown PCD DATA mode {mode!r} (ascii or binary expected)")
    kinds = {"F": "f", "I": "i", "U": "u"}
    try:
        dtype = np.dtype([(f"{f}_{k}", "<" + kinds[t.upper()] + str(s)) for f, s, t, c in
                          zip(fields, sizes, types, counts, strict=True) for k in range(c)])
    except (KeyError, TypeError):
        raise MediaError(f"{name}: unsupported PCD field types {types} / sizes {sizes}") from None
    if body + dtype.itemsize * points > len(data):
        raise MediaError(f"{name}: the PCD file is truncated (fewer bytes than its {points} points need)")
    rec = np.frombuffer(data, dtype=dtype, count=points, offset=body)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf are reported by the caller
        return np.stack([rec[f"{a}_0"].astype(np.float64) for a in "xyz"], axis=1)


def _check_compressed_block(data: bytes, body: int, expected: int, name: str) -> None:
    """A ``binary_compressed`` PCD body is two little-endian uint32 (compressed, uncompressed size) and the LZF
    bytes. Checked here, before the open3d child process (seconds to start), so a damaged file is refused at once."""
    if body + 8 > len(data):
        raise MediaError(f"{name}: the PCD file is truncated (no compressed data after its header)")
    compressed, uncompressed = struct.unpack_from("<II", data, body)
    if uncompressed != expected:
        raise MediaError(f"{name}: the PCD file is damaged (its compressed block declares {uncompressed:,} bytes "
                         f"of data; the header's points and fields need {expected:,})")
    if body + 8 + compressed > len(data):
        raise MediaError(f"{name}: the PCD file is truncated ({len(data) - body - 8} of its {compressed} "
                         "compressed bytes)")


# ----------------------------------------------------------------------------------------------------------
# Text tables (xyz, pts, txt, csv) and OBJ

_NUMBER = rb"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf)"


def _decimal_commas(lines: list[bytes]) -> bool:
    """Whether a table writes its decimal marks as commas ("0,507;9,81", a spreadsheet's export in many locales):
    its rows are separated by semicolons or tabs, hold commas between digits and no decimal points."""
    separated = [ln for ln in lines if b";" in ln or b"\t" in ln]
    return (any(re.search(rb"\d,\d", ln) for ln in separated)
            and not any(re.search(rb"\d\.\d", ln) for ln in separated))


def read_table(path: Path, limits: Limits, min_columns: int = 3, max_columns: int | None = None,
               max_rows: int | None = None) -> np.ndarray:
    """The leading numeric columns of a delimited text table (comma, semicolon, tab or space separated; decimal
    commas where the columns are separated by semicolons or tabs).

    Header lines (and a leading count line, as in .pts files) are skipped: data start at the first row whose
    first ``min_columns`` fields are numbers. Up to ``max_columns`` (default ``min_columns``) columns are kept,
    as many as that first row has. ``max_rows`` defaults to ``limits.max_points``.
    """
    name = path.name
    max_columns = max_columns or min_columns
    max_rows = limits.max_points if max_rows is None else max_rows
    data = path.read_bytes()
    if b"\x00" in data[:4096]:
        raise MediaError(f"{name} is not a text table")
    if data.count(b"\n") > max_rows + 1000:  # before splitting: a list of 70 million lines takes gigabytes
        raise MediaError(f"{name} has over {max_rows:,} rows; the limit is {max_rows:,}")
    lines = data.splitlines()
    if _decimal_commas(lines[:1000]):
        lines = [ln.replace(b",", b".") for ln in lines]
    first, ncols = None, 0
    for i, line in enumerate(lines[:1000]):
        fields = [f for f in re.split(rb"[,;\s]+", line.strip()) if f]
        numeric = 0
        while numeric < len(fields) and re.fullmatch(_NUMBER, fields[numeric], re.I):
            numeric += 1
        if numeric >= min_columns:
            first, ncols = i, min(numeric, max_columns)
            break
    if first is None:
        raise MediaError(f"{name}: no row with {min_columns} numeric columns found in the first 1000 lines")
    body = [ln for ln in lines[first:] if ln.strip() and not ln.lstrip().startswith(b"#")]
    if len(body) > max_rows:
        raise MediaError(f"{name} has {len(body):,} rows; the limit is {max_rows:,}")
    sample = body[0]
    delimiter = "," if b"," in sample else ";" if b";" in sample else None
    try:
        table = np.loadtxt(body, delimiter=delimiter, usecols=range(ncols), dtype=np.float64, ndmin=2,
                           encoding="latin-1")
    except (ValueError, IndexError) as exc:
        raise MediaError(f"{name}: every data row needs {ncols} numeric columns ({exc})") from None
    return table


def read_obj(path: Path, limits: Limits) -> np.ndarray:
    name = path.name
    data = path.read_bytes()
    # Counted before the tuples of every vertex are made (gigabytes for a 200 MB file); lines indented before
    # their "v" are counted by the check after.
    _check_count(name, data.startswith((b"v ", b"v\t")) + data.count(b"\nv ") + data.count(b"\nv\t"), limits)
    rows = re.findall(rb"^[ \t]*v[ \t]+(\S+)[ \t]+(\S+)[ \t]+(\S+)", data, re.M)
    if not rows:
        raise MediaError(f"{name}: no vertex ('v x y z') lines found in the OBJ file")
    _check_count(name, len(rows), limits)
    try:
        return np.array(rows, dtype=np.float64)
    except ValueError:
        raise MediaError(f"{name}: non-numeric vertex coordinates in the OBJ file") from None


# ----------------------------------------------------------------------------------------------------------
# NPY / NPZ


def read_array_points(path: Path, limits: Limits) -> np.ndarray:
    """The (N, 3) xyz of a .npy / .npz array of shape (N, >=3) (the columns after the third are ignored)."""
    name = path.name
    shape, _ = array_header(path)
    if len(shape) != 2 or shape[1] < 3:
        raise MediaError(f"{name}: a point cloud array must have shape (N, 3) or (N, >3); this one is {shape}")
    _check_count(name, shape[0], limits)
    return read_array(path, limits, "point cloud")[:, :3].astype(np.float64)


__all__ = ["read_ply", "write_ply", "read_pcd", "read_table", "read_obj", "read_array_points"]
