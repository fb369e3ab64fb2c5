"""The one vocabulary of inputs: each media kind with its encoder branch, accepted extensions and icon.

Two words, two meanings, used the same way everywhere:
- a **media kind** (also "modality" in the UI, CLI, API and ``Attachment.modality``) is what a file holds:
  "image", "video", "audio", "text", "point", "depth", "thermal", "imu";
- an **encoder branch** is the ImageBind / Point-Bind tower that encodes it: "vision" (images and videos), "text",
  "audio", "depth", "thermal", "imu", "point".
"""

from __future__ import annotations

from dataclasses import dataclass

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class MediaKind:
    name: str
    branch: str  # the encoder branch that encodes it
    extensions: tuple[str, ...]  # accepted file extensions (several kinds share some: media.detect decides)
    icon: str
    label: str  # how the UI and help texts name it


KINDS: dict[str, MediaKind] = {k.name: k for k in (
    MediaKind("image", "vision", _IMAGE_EXTENSIONS, "🖼️", "image"),
    MediaKind("video", "vision", (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi"), "🎬", "video"),
    MediaKind("audio", "audio", (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".m4a", ".aac",
                                 ".webm", ".mp4", ".mkv"), "🔊", "audio"),
    MediaKind("text", "text", (".txt",), "📝", "text"),
    MediaKind("point", "point", (".ply", ".pcd", ".xyz", ".pts", ".txt", ".csv", ".npy", ".npz", ".obj", ".off",
                                 ".stl"), "🧊", "3D point cloud"),
    MediaKind("depth", "depth", (".png", ".tif", ".tiff", ".npy", ".npz"), "🌊", "depth map"),
    MediaKind("thermal", "thermal", _IMAGE_EXTENSIONS, "🌡️", "thermal image"),
    MediaKind("imu", "imu", (".npy", ".npz", ".csv", ".txt"), "📈", "IMU recording"),
)}
"""Media kinds in the order the UI, the CLI's flags and the docs list them."""

MEDIA_KINDS: tuple[str, ...] = tuple(KINDS)

ENCODER_BRANCHES: tuple[str, ...] = ("vision", "text", "audio", "depth", "thermal", "imu", "point")
"""ImageBind's towers in the official checkpoint's order, Point-Bind's last."""

ALL_EXTENSIONS: tuple[str, ...] = tuple(sorted({e for kind in KINDS.values() for e in kind.extensions}))
"""Every accepted extension (e.g. for an upload widget's file-type filter)."""


def branch_of(kind: str) -> str:
    """The encoder branch of a media kind (KeyError for an unknown kind)."""
    return KINDS[kind].branch


__all__ = ["MediaKind", "KINDS", "MEDIA_KINDS", "ENCODER_BRANCHES", "ALL_EXTENSIONS", "branch_of"]
