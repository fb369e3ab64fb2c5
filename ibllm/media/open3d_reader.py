"""open3d, for the point-cloud variants our own parsers leave out (LZF-compressed binary PCD).

open3d's C++ readers are not hardened against hostile files, so they run in a child process with a time limit:
a crash or a hang there becomes a MediaError, never the server's death. open3d needs ``libusb-1.0`` loaded
before it imports; the ``libusb-package`` wheel ships one, preloaded here (no apt package needed).

Child protocol: ``python -m ibllm.media.open3d_reader IN.pcd OUT.npy`` writes the (N, 3) float64 points.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ibllm.media.errors import MediaError

TIMEOUT_S = 60.0


def import_open3d():
    """``import open3d`` with libusb preloaded from the libusb-package wheel when the system has none."""
    # Imported here, in the child process that decodes compressed PCD: open3d's import needs libusb loaded first,
    # and the server process never loads open3d at all.
    try:
        import libusb_package  # (see above: only in the decoding child)

        ctypes.CDLL(str(libusb_package.get_library_path()), mode=ctypes.RTLD_GLOBAL)
    except (ImportError, OSError):
        pass  # a system libusb (apt libusb-1.0-0) may still be there
    import open3d  # after the libusb preload above, which it needs

    return open3d


def read_points_isolated(path: str | Path, timeout: float = TIMEOUT_S) -> np.ndarray:
    """The xyz points of a file as open3d reads them, decoded in a child process."""
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "points.npy"
        try:
            result = subprocess.run([sys.executable, "-m", "ibllm.media.open3d_reader", str(path), str(out)],
                                    capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise MediaError(f"{path.name}: reading the point cloud took longer than {timeout:.0f} s") from None
        if result.returncode != 0 or not out.is_file():
            reason = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
            raise MediaError(f"{path.name}: the point cloud could not be decoded ({reason[0][:200]})")
        points = np.load(out, allow_pickle=False)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise MediaError(f"{path.name}: the file holds no points")
    return points


def _child(src: str, dst: str) -> int:
    o3d = import_open3d()
    cloud = o3d.io.read_point_cloud(src, format="pcd", print_progress=False)
    points = np.asarray(cloud.points, dtype=np.float64)
    if len(points) == 0:
        print("no points could be read", file=sys.stderr)
        return 1
    np.save(dst, points)
    return 0


if __name__ == "__main__":
    raise SystemExit(_child(sys.argv[1], sys.argv[2]))
