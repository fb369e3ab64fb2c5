import threading

import faiss
import numpy as np
import pytest
import torch

from ibllm.cache import VisualCache


def unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, dim))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_search_and_mix_match_brute_force():
    vecs = unit_rows(300, 16)
    cache = VisualCache.build(vecs, captions=[f"c{i}" for i in range(300)])
    assert cache.kind == "flat"
    v = torch.from_numpy(unit_rows(3, 16, seed=1) * 0.8)
    k, t, w = 7, 20.0, 0.4
    sims_all = v.numpy() @ vecs.T
    top = np.argsort(-sims_all, axis=1)[:, :k]
    found = cache.search(v, k)
    np.testing.assert_array_equal(found.rows, top)
    np.testing.assert_allclose(found.sims, np.take_along_axis(sims_all, top, 1), atol=1e-6)
    assert found.captions[0] == [f"c{r}" for r in top[0]]
    assert found.ids[2] == top[2].tolist()  # no ids given: the row numbers

    s = np.take_along_axis(sims_all, top, 1) * t
    a = np.exp(s - s.max(1, keepdims=True))
    a /= a.sum(1, keepdims=True)
    c = np.einsum("bk,bke->be", a, vecs[top])
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    want = (1 - w) * v.numpy() + w * c
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(cache.mix(v, k, t, w).numpy(), want, atol=1e-6)
    np.testing.assert_allclose(cache.mix(v[0], k, t, w).numpy(), want[0], atol=1e-6)  # a single (E,) vector


def test_a_stored_row_asked_as_a_query_can_leave_itself_out():
    vecs = unit_rows(200, 16, seed=2)
    cache = VisualCache.build(vecs, captions=[f"c{i}" for i in range(200)])
    queries, k, t, w = torch.from_numpy(vecs[[5, 17, 42]]), 6, 20.0, 0.5
    found = cache.search(queries, k + 1).leave_out([5, 17, -1], k)
    sims_all = vecs[[5, 17, 42]] @ vecs.T
    sims_all[0, 5] = sims_all[1, 17] = -np.inf  # the third query keeps itself
    top = np.argsort(-sims_all, axis=1)[:, :k]
    np.testing.assert_array_equal(found.rows, top)
    assert found.rows[2, 0] == 42 and 5 not in found.rows[0] and 17 not in found.rows[1]
    assert found.captions[1] == [f"c{r}" for r in top[1]]
    # mix(exclude=...) mixes with exactly those neighbours: the same as a cache without the query's own row
    without = VisualCache.build(np.delete(vecs, 5, axis=0))
    np.testing.assert_allclose(cache.mix(queries[:1], k, t, w, exclude=[5]).numpy(),
                               without.mix(queries[:1], k, t, w).numpy(), atol=1e-6)
    assert not np.allclose(cache.mix(queries[:1], k, t, w).numpy(), without.mix(queries[:1], k, t, w).numpy())


def test_save_load_round_trip(tmp_path):
    vecs = unit_rows(50, 8)
    ids = [f"img{i:03d}" for i in range(50)]
    cache = VisualCache.build(vecs, ids=ids, captions=[f"caption {i}" for i in range(50)],
                              thumbnails=[f"thumbs/{i}.jpg" for i in range(50)])
    cache.save(tmp_path / "cache")
    back = VisualCache.load(tmp_path / "cache")
    assert len(back) == 50 and back.dim == 8 and back.ids == ids and back.kind == "flat"
    np.testing.assert_array_equal(back.vectors(np.arange(50)), vecs)
    q = unit_rows(2, 8, seed=3)
    a, b = cache.search(q, 5), back.search(q, 5)
    np.testing.assert_array_equal(a.rows, b.rows)
    # Relative thumbnail paths are resolved against the cache folder, so a shipped cache can move.
    assert b.ids[0] == [ids[r] for r in a.rows[0]]
    assert b.thumbnails[1][0] == str(tmp_path / "cache" / f"thumbs/{a.rows[1][0]}.jpg")


def test_loads_a_bare_official_style_index(tmp_path):
    vecs = unit_rows(40, 8)
    index = faiss.IndexFlatIP(8)
    index.add(vecs)
    faiss.write_index(index, str(tmp_path / "knn.index"))
    for mmap in (True, False):
        cache = VisualCache.load(tmp_path / "knn.index", mmap=mmap)
        assert len(cache) == 40 and cache.captions is None
        np.testing.assert_array_equal(cache.vectors(np.array([[3, 7]])), vecs[[3, 7]][None])
        assert cache.search(vecs[5], 1).rows[0, 0] == 5


def test_auto_kind_by_size_and_hnsw_recall_on_clustered_data(tmp_path):
    vecs = clustered(6000, 32, clusters=60)
    assert VisualCache.build(vecs[:100], exact_max=100).kind == "flat"
    cache = VisualCache.build(vecs, exact_max=1000)
    assert cache.kind == "hnsw"
    queries = clustered(200, 32, clusters=60, seed=1)  # fresh points from the same kind of data
    assert cache.recall_at_10(queries) >= 0.9
    assert cache.recall_at_10(100) >= 0.9
    assert VisualCache.build(vecs[:500]).recall_at_10(50) == 1.0  # exact search is its own ground truth
    cache.save(tmp_path / "h")
    back = VisualCache.load(tmp_path / "h")
    assert back.kind == "hnsw"
    np.testing.assert_array_equal(back.search(queries[:5], 10).rows, cache.search(queries[:5], 10).rows)


def test_to_hnsw_keeps_rows_and_metadata():
    vecs = clustered(2000, 16, clusters=20)
    flat = VisualCache.build(vecs, captions=[str(i) for i in range(2000)])
    hnsw = flat.to_hnsw()
    assert hnsw.kind == "hnsw" and hnsw.captions == flat.captions
    np.testing.assert_array_equal(hnsw.vectors(np.arange(10)), vecs[:10])
    assert hnsw.recall_at_10(100) >= 0.9


def test_concurrent_searches_match_serial_results():
    cache = VisualCache.build(clustered(3000, 32, clusters=30), exact_max=1000)
    queries = clustered(64, 32, clusters=30, seed=2)
    serial = [cache.search(q, 10).rows for q in queries]
    results: dict[int, np.ndarray] = {}

    def worker(i: int) -> None:
        for _ in range(3):
            results[i] = cache.search(queries[i], 10).rows

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(queries))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i, rows in enumerate(serial):
        np.testing.assert_array_equal(results[i], rows)


def test_bad_inputs_are_refused():
    cache = VisualCache.build(unit_rows(10, 8))
    with pytest.raises(ValueError, match="width"):
        cache.search(np.zeros(9, np.float32), 3)
    with pytest.raises(ValueError, match="entries"):
        VisualCache.build(unit_rows(10, 8), captions=["x"])
    with pytest.raises(ValueError, match="inner-product"):
        VisualCache(faiss.IndexFlatL2(8))
