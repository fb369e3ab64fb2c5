"""Plain data passed between the engine (ibllm.engine), the CLI and the UI. No tensors, no Gradio."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# The default model's answer to a question without an input (with a weight above 0): it can only describe inputs.
# The app's words, not the model's: chat histories leave such a turn out (ibllm.ui.history).
NEEDS_INPUT = ("I am the small default model: I can only tell you about the files you give me (their shape, colour, "
               "size, position, motion or sound). Attach an image, video, sound, 3D point cloud, depth or thermal "
               "map, IMU trace or text file (in the app, or click an example), then ask. For open conversation, "
               "load the real ImageBind-LLM weights (the app's Model tab and the README say how).")


@dataclass(frozen=True)
class Attachment:
    """One input of a chat turn: a file (or a piece of text) with its modality and mixing weight (0 drops it)."""

    path: str
    modality: str  # "image", "video", "audio", "point", "depth", "thermal", "imu", "text"
    weight: float = 1.0


@dataclass(frozen=True)
class Turn:
    """An earlier exchange of the conversation."""

    user: str
    assistant: str


@dataclass(frozen=True)
class Neighbour:
    """A visual-cache entry retrieved for the fused feature (shown by the UI's inspector)."""

    index: int
    similarity: float
    caption: str | None = None
    thumbnail: str | None = None


@dataclass
class Timings:
    """Where the time of one answer went (seconds)."""

    encode: float = 0.0
    cache: float = 0.0
    bind: float = 0.0
    queued: float = 0.0  # waiting for a free decode slot
    prefill: float = 0.0
    decode: float = 0.0
    prompt_tokens: int = 0
    new_tokens: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first token comes out of the prefill; decode time covers the ones after it.
        return (self.new_tokens - 1) / self.decode if self.decode > 0 and self.new_tokens > 1 else 0.0

    def summary(self) -> str:
        waited = f"queued {self.queued * 1000:.0f} ms · " if self.queued >= 0.001 else ""
        return waited + (f"encode {self.encode * 1000:.0f} ms · retrieve {self.cache * 1000:.0f} ms · "
                f"bind {self.bind * 1000:.0f} ms · prefill {self.prefill * 1000:.0f} ms "
                f"({self.prompt_tokens} tok) · decode {self.decode * 1000:.0f} ms "
                f"({self.new_tokens} tok, {self.decode_tokens_per_s:.1f} tok/s)")


@dataclass
class ChatEvent:
    """One step of a streamed answer: ``delta`` is the new text since the previous event."""

    delta: str = ""
    text: str = ""  # the answer so far
    done: bool = False
    timings: Timings = field(default_factory=Timings)
    neighbours: list[Neighbour] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. "dropped 2 oldest turns to fit the context"
    # While the answer waits for a free decode slot: its place in line (1 = next; position - 1 requests ahead of
    # it), in events with no text. 0 once it is being answered.
    queue_position: int = 0


@dataclass(frozen=True)
class ModelInfo:
    """What the UI's model panel shows."""

    name: str
    weights: str  # human description: "embedded toy model (trained by ibllm)", "random tiny weights", paths...
    device: str
    dtype: str
    is_default: bool
    trained: bool
    cache_entries: int = 0
    how_to_load_real: str = ""
    memory: str = ""  # the memory plan's one-line verdict (which dtype and why), for the Model tab
    compute: str = ""  # how many-token steps compute with half-precision weights on a CPU (ibllm.halfgemm.describe)
    decode: str = ""  # what one-token steps of half-precision CPU weights run on (ibllm.llm.gemv.status)

    @property
    def api_id(self) -> str:
        """The id the OpenAI-compatible API serves the model under: its name in lower case, words joined by "-",
        repeats dropped ("toy (toy)" -> "toy", "ImageBind-LLM" -> "imagebind-llm")."""
        words = re.findall(r"[a-z0-9.]+", self.name.lower())
        return "-".join(dict.fromkeys(words)) or "ibllm"


@dataclass
class PictureTimings:
    """Where the time of one picture went (seconds)."""

    encode: float = 0.0  # inputs -> fused, cache-mixed feature
    queued: float = 0.0  # waiting for the pipeline (one picture at a time)
    load: float = 0.0  # loading the pipeline (the first picture only)
    denoise: float = 0.0
    decode: float = 0.0  # the VAE, latents -> pixels
    steps: int = 0  # denoising steps done

    @property
    def seconds_per_step(self) -> float:
        return self.denoise / self.steps if self.steps else 0.0

    @property
    def total(self) -> float:
        return self.encode + self.queued + self.load + self.denoise + self.decode

    def summary(self) -> str:
        parts = [f"queued {self.queued:.1f} s"] if self.queued >= 0.05 else []
        if self.load:
            parts.append(f"pipeline loaded in {self.load:.1f} s")
        parts.append(f"{self.steps} steps in {self.denoise:.1f} s ({self.seconds_per_step:.2f} s/step)")
        parts.append(f"decode {self.decode:.1f} s")
        return " · ".join(parts)


@dataclass
class PictureEvent:
    """One step of a picture answer; the last one (``done``) carries the picture (a PIL image)."""

    step: int = 0  # denoising steps done so far
    steps: int = 0  # of this many
    queue_position: int = 0  # pictures ahead of this one for the pipeline (drawn one at a time)
    loading: bool = False  # the pipeline is being loaded (the first picture)
    seed: int | None = None  # the seed drawn with (repeat it to get the same picture)
    image: Any = None
    done: bool = False
    timings: PictureTimings = field(default_factory=PictureTimings)
