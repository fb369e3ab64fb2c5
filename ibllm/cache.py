"""The visual cache: Tip-Adapter-style retrieval over ImageBind image embeddings on faiss (REFERENCE.md section 4).

For a fused feature v: search the top-k stored vectors by inner product (similarities s, vectors P), then
``a = softmax(t * s)``, ``c = normalise(a @ P)``, ``v' = normalise((1 - w) v + w c)``.

Index type by size: an exact ``IndexFlatIP`` up to ``EXACT_MAX`` vectors (a single 1024-d query scans 100k rows in
~20 ms on one core); above that an HNSW graph with inner product (sub-millisecond, recall@10 measured by
``recall_at_10``). The stored vectors are the ones the index already holds (``reconstruct``), so the cache keeps
no second copy: the official 13 GB ``knn.index`` opens memory-mapped and costs no RAM until touched.

On disk a cache is a directory: ``index.faiss`` plus ``meta.json`` (kind, dim, count and optional per-row ids,
captions and thumbnail paths). ``VisualCache.load`` also takes a bare faiss index file such as ``knn.index``.

Thread safety: searches may come from several Gradio workers at once. faiss already spreads one search over all
cores with OpenMP, so concurrent calls would only oversubscribe the CPU; a lock serialises them, which also
keeps ``add`` from racing a search.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch

EXACT_MAX = 100_000
INDEX_FILE, META_FILE = "index.faiss", "meta.json"

# Below this many queries faiss scans row by row; above, it uses one BLAS matmul. The library default (128000 in
# faiss 1.15) never takes the BLAS path for UI-sized batches; 4 makes a 64-query batch ~10x faster (bench/).
BLAS_THRESHOLD = 4


def configure_faiss() -> None:
    """Process-wide faiss settings this module relies on (idempotent)."""
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD


@dataclass
class SearchResult:
    """Top-k neighbours per query, best first. ``rows`` index the faiss index; ``ids`` are the caller's ids."""

    rows: np.ndarray  # (B, k) int64
    sims: np.ndarray  # (B, k) float32 inner products
    ids: list[list[str | int]] = field(default_factory=list)
    captions: list[list[str | None]] = field(default_factory=list)
    thumbnails: list[list[str | None]] = field(default_factory=list)

    def leave_out(self, rows: Sequence[int] | np.ndarray, k: int) -> SearchResult:
        """The first ``k`` neighbours of each query other than its stored row in ``rows`` (-1: none): a stored
        image asked as a query must not find itself (training on the cache's own images)."""
        keep = self.rows != np.asarray(rows, dtype=np.int64)[:, None]
        cols = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept columns first, in their order

        def pick(values: list[list]) -> list[list]:
            return [[row[c] for c in cs] for row, cs in zip(values, cols.tolist(), strict=True)] if values else values

        return SearchResult(np.take_along_axis(self.rows, cols, 1), np.take_along_axis(self.sims, cols, 1),
                            pick(self.ids), pick(self.captions), pick(self.thumbnails))


def _as_matrix(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x[None] if x.ndim == 1 else x


def _normalise(x: torch.Tensor) -> torch.Tensor:
    # x / ||x|| exactly as the reference (F.normalize would clamp the norm with an eps).
    return x / x.norm(dim=-1, keepdim=True)


class VisualCache:
    """A faiss inner-product index with optional per-row ids / captions / thumbnails."""

    def __init__(self, index: faiss.Index, *, ids: Sequence[str | int] | None = None,
                 captions: Sequence[str | None] | None = None, thumbnails: Sequence[str | None] | None = None,
                 ef_search: int = 64):
        configure_faiss()
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError("the visual cache needs an inner-product index")
        self.index = index
        n = index.ntotal
        for name, values in (("ids", ids), ("captions", captions), ("thumbnails", thumbnails)):
            if values is not None and len(values) != n:
                raise ValueError(f"{name}: {len(values)} entries for {n} vectors")
        self.ids = list(ids) if ids is not None else None
        self.captions = list(captions) if captions is not None else None
        self.thumbnails = list(thumbnails) if thumbnails is not None else None
        self.ef_search = ef_search
        self._lock = threading.Lock()

    # -- construction -----------------------------------------------------------------------------------------

    @classmethod
    def build(cls, embeddings: torch.Tensor | np.ndarray, *, ids: Sequence[str | int] | None = None,
              captions: Sequence[str | None] | None = None, thumbnails: Sequence[str | None] | None = None,
              kind: str = "auto", exact_max: int = EXACT_MAX, hnsw_m: int = 32, ef_construction: int = 80,
              ef_search: int = 64) -> VisualCache:
        """Index (N, E) embeddings as given (ImageBind image embeddings are stored L2-normalised).

        kind: "flat" (exact), "hnsw", or "auto" (flat up to ``exact_max`` rows, HNSW above).
        """
        x = _as_matrix(embeddings)
        n, dim = x.shape
        if kind == "auto":
            kind = "flat" if n <= exact_max else "hnsw"
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
        else:
            raise ValueError(f"unknown index kind {kind!r} (flat, hnsw, auto)")
        index.add(x)
        return cls(index, ids=ids, captions=captions, thumbnails=thumbnails, ef_search=ef_search)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            faiss.write_index(self.index, str(directory / INDEX_FILE))
        meta = {"kind": self.kind, "dim": self.dim, "count": len(self), "ef_search": self.ef_search,
                "ids": self.ids, "captions": self.captions, "thumbnails": self.thumbnails}
        (directory / META_FILE).write_text(json.dumps(meta, ensure_ascii=False))
        return directory

    @classmethod
    def load(cls, path: str | Path, *, mmap: bool = True) -> VisualCache:
        """A directory written by ``save``, or a bare faiss index file (e.g. the official ``knn.index``).

        ``mmap``: map flat indexes instead of reading them (the 13 GB CC3M index then costs no RAM up front).
        """
        path = Path(path)
        index_path = path / INDEX_FILE if path.is_dir() else path
        if not index_path.is_file():
            raise FileNotFoundError(f"no faiss index at {index_path}")
        flags = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP) if mmap else 0
        index = faiss.read_index(str(index_path), flags)
        meta: dict = {}
        if path.is_dir() and (path / META_FILE).is_file():
            meta = json.loads((path / META_FILE).read_text())
            if meta.get("count", index.ntotal) != index.ntotal:
                raise ValueError(f"{path}: meta.json describes {meta['count']} rows, the index has {index.ntotal}")
        thumbnails = meta.get("thumbnails")
        if thumbnails is not None:  # paths relative to the cache directory (a shipped cache can move)
            thumbnails = [t if t is None or Path(t).is_absolute() else str(path / t) for t in thumbnails]
        return cls(index, ids=meta.get("ids"), captions=meta.get("captions"), thumbnails=thumbnails,
                   ef_search=meta.get("ef_search", 64))

    def to_hnsw(self, *, hnsw_m: int = 32, ef_construction: int = 80, chunk: int = 100_000) -> VisualCache:
        """An HNSW copy (same rows, same metadata), e.g. of the official flat ``knn.index``. Build once, ``save``."""
        index = faiss.IndexHNSWFlat(self.dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        for start in range(0, len(self), chunk):
            index.add(self.index.reconstruct_n(start, min(chunk, len(self) - start)))
        return VisualCache(index, ids=self.ids, captions=self.captions, thumbnails=self.thumbnails,
                           ef_search=self.ef_search)

    # -- queries ------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def kind(self) -> str:
        if isinstance(self.index, faiss.IndexHNSW):
            return "hnsw"
        return "flat" if isinstance(self.index, faiss.IndexFlat) else type(self.index).__name__

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if queries.shape[1] != self.dim:
            raise ValueError(f"query width {queries.shape[1]} != cache width {self.dim}")
        k = min(int(k), len(self))
        if k < 1:
            raise ValueError("k must be >= 1 and the cache non-empty")
        params = None
        if self.kind == "hnsw":  # per-call parameters: no shared efSearch state between threads
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(self.ef_search, k)
        with self._lock:
            sims, rows = self.index.search(queries, k, params=params)
        return sims, rows

    def search(self, query: torch.Tensor | np.ndarray, k: int) -> SearchResult:
        """Top-k rows by inner product for (E,) or (B, E) queries, with their ids / captions / thumbnails."""
        sims, rows = self._search(_as_matrix(query), k)

        def pick(values: list | None) -> list[list]:  # faiss marks "fewer than k found" with row -1
            return [[values[r] if values is not None and r >= 0 else None for r in row] for row in rows.tolist()]

        ids = pick(self.ids) if self.ids is not None else rows.tolist()
        return SearchResult(rows, sims, ids, pick(self.captions), pick(self.thumbnails))

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """Stored vectors of ``rows`` (any shape) -> rows.shape + (E,), read back from the index."""
        flat = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
        with self._lock:
            out = self.index.reconstruct_batch(flat)
        return out.reshape(*np.shape(rows), self.dim)

    def mix(self, v: torch.Tensor, k: int, t: float, weight: float,
            exclude: Sequence[int] | None = None) -> torch.Tensor:
        """``normalise((1 - weight) v + weight normalise(softmax(t s) @ P))`` for fused features v (B, E).

        ``exclude``: per query, a stored row it may not retrieve (-1: none); see ``SearchResult.leave_out``."""
        return self.mix_with_neighbours(v, k, t, weight, exclude)[0]

    def mix_with_neighbours(self, v: torch.Tensor, k: int, t: float, weight: float,
                            exclude: Sequence[int] | None = None) -> tuple[torch.Tensor, SearchResult]:
        """``mix`` plus what was retrieved (for the UI's neighbour view)."""
        squeeze = v.ndim == 1
        v2 = v[None] if squeeze else v
        found = self.search(v2, k) if exclude is None else self.search(v2, k + 1).leave_out(exclude, k)
        sims = torch.from_numpy(found.sims).to(v.device)
        protos = torch.from_numpy(self.vectors(found.rows)).to(v.device)  # (B, k, E)
        a = (sims * t).softmax(dim=-1)
        c = _normalise((a.unsqueeze(1) @ protos).squeeze(1))
        mixed = _normalise((1 - weight) * v2.float() + weight * c).to(v.dtype)
        return (mixed[0] if squeeze else mixed), found

    # -- quality ------------------------------------------------------------------------------------------------

    def exact_topk(self, queries: np.ndarray, k: int, chunk: int = 100_000) -> np.ndarray:
        """Brute-force top-k rows (ground truth), scanning the stored vectors in chunks to bound memory."""
        q = _as_matrix(queries)
        best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
        best_r = np.zeros((len(q), 0), dtype=np.int64)
        for start in range(0, len(self), chunk):
            with self._lock:
                block = self.index.reconstruct_n(start, min(chunk, len(self) - start))
            s = np.concatenate([best_s, q @ block.T], axis=1)
            r = np.concatenate([best_r, np.broadcast_to(np.arange(start, start + len(block)), (len(q), len(block)))],
                               axis=1)
            keep = np.argsort(-s, axis=1, kind="stable")[:, :k]
            best_s, best_r = np.take_along_axis(s, keep, 1), np.take_along_axis(r, keep, 1)
        return best_r

    def recall_at_10(self, sample: int | np.ndarray = 1000, *, seed: int = 0) -> float:
        """Fraction of the exact top-10 that the index returns, averaged over queries.

        ``sample``: an array of queries, or a number of stored rows drawn at random and used as queries.
        """
        if isinstance(sample, int | np.integer):
            rng = np.random.default_rng(seed)
            rows = rng.choice(len(self), size=min(int(sample), len(self)), replace=False)
            queries = self.vectors(rows)
        else:
            queries = _as_matrix(sample)
        k = min(10, len(self))
        truth = self.exact_topk(queries, k)
        _, got = self._search(queries, k)
        hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(truth, got, strict=True))
        return hits / (len(queries) * k)
