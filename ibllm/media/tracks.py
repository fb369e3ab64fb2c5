"""What a media container's header declares against what its packets hold, read with PyAV (nothing decoded).

Used where decord's own errors cannot tell two cases apart: a file whose tracks are all sound (an M4A saved as
.mp4: audio, not a broken video) and a file cut inside its index (a damaged video); and to see a file that ends
before what its header lists (``video._check_complete``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av


@dataclass(frozen=True)
class Tracks:
    types: list[str]  # the stream types
    frames: int = 0  # the video track's declared frame count; 0 where the format stores none (WebM, Matroska)
    present: int = 0  # video packets in the file
    seconds: float = 0.0  # the declared duration; 0 where none is stored (a browser's recording)
    reach: float = 0.0  # where the last packet of any track ends, from the container's start


def read_tracks(path: str | Path) -> Tracks:
    """Raises where the header itself cannot be read."""
    with av.open(str(path)) as container:
        types = [s.type for s in container.streams]
        if "video" not in types:
            return Tracks(types)
        video = container.streams.video[0]
        present, reach = 0, 0.0
        start = (container.start_time or 0) / av.time_base
        for packet in container.demux():
            if not packet.size or packet.pts is None or packet.time_base is None:
                continue
            present += packet.stream is video
            reach = max(reach, float((packet.pts + (packet.duration or 0)) * packet.time_base) - start)
        seconds = (container.duration or 0) / av.time_base
        return Tracks(types, int(video.frames or 0), present, seconds, reach)


def sound_only(path: str | Path) -> bool:
    """True only for a readable file with a sound track and no video track (an .m4a saved as .mp4); a damaged
    header that hides its video track (a file cut inside its index shows a bare data track) is not this."""
    try:
        with av.open(str(path)) as container:
            types = {s.type for s in container.streams}
    except Exception:
        return False
    return "audio" in types and "video" not in types
