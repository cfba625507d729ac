"""RetrievalIndex: MindEye2 cosine retrieval over flattened token embeddings, torch and FAISS backends."""

import json

import numpy as np
import pytest
import torch

from rtdecode.errors import CheckpointError, ModelError
from rtdecode.models import retrieval
from rtdecode.models.retrieval import Match, RetrievalIndex

N_ITEMS, N_TOKENS, DIM = 300, 6, 20  # 120 features per flattened embedding
TARGETS = [0, 3, 77, 150, 299]


@pytest.fixture(scope="module")
def pool() -> torch.Tensor:
    return torch.randn(N_ITEMS, N_TOKENS, DIM, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ids() -> list[str]:
    return [f"img{i:04d}" for i in range(N_ITEMS)]


def _noisy_copies(pool: torch.Tensor, targets: list[int], seed: int = 1) -> torch.Tensor:
    """Items plus noise of the same power (SNR 1): cosine to the original is about 0.7, to others about 0."""
    noise = torch.randn(len(targets), N_TOKENS, DIM, generator=torch.Generator().manual_seed(seed))
    return pool[targets] + noise


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_noisy_copy_retrieves_its_item_at_rank_one(pool, ids, backend):
    index = RetrievalIndex(ids, pool, backend=backend)
    assert index.backend == backend and len(index) == N_ITEMS and index.n_features == N_TOKENS * DIM
    results = index.search(_noisy_copies(pool, TARGETS), k=5)
    assert [matches[0].id for matches in results] == [ids[t] for t in TARGETS]
    for matches in results:
        assert len(matches) == 5 and all(isinstance(m, Match) for m in matches)
        scores = [m.score for m in matches]
        assert scores == sorted(scores, reverse=True)
        assert scores[0] > 0.5 > scores[1]


def test_scores_are_cosine_similarities_of_flattened_embeddings(pool, ids):
    index = RetrievalIndex(ids, pool, backend="torch")
    queries = _noisy_copies(pool, [5, 6])
    matches = index.search(queries, k=3)
    for query, query_matches in zip(queries, matches, strict=True):
        for match in query_matches:
            item = pool[ids.index(match.id)]
            expected = torch.nn.functional.cosine_similarity(query.flatten(), item.flatten(), dim=0)
            assert match.score == pytest.approx(expected.item(), abs=1e-6)


def test_token_and_flat_layouts_and_numpy_agree(pool, ids):
    queries = torch.randn(4, N_TOKENS, DIM, generator=torch.Generator().manual_seed(2))
    from_tokens = RetrievalIndex(ids, pool).search(queries, k=4)
    from_flat = RetrievalIndex(ids, pool.reshape(N_ITEMS, -1).numpy()).search(queries.reshape(4, -1).numpy(), k=4)
    assert from_tokens == from_flat


def test_torch_and_faiss_flat_agree(pool, ids):
    queries = torch.randn(20, N_TOKENS, DIM, generator=torch.Generator().manual_seed(3))
    exact = RetrievalIndex(ids, pool, backend="torch").search(queries, k=5)
    flat = RetrievalIndex(ids, pool, backend="faiss", faiss_factory="Flat").search(queries, k=5)
    assert [[m.id for m in row] for row in exact] == [[m.id for m in row] for row in flat]
    exact_scores = np.array([[m.score for m in row] for row in exact])
    flat_scores = np.array([[m.score for m in row] for row in flat])
    np.testing.assert_allclose(exact_scores, flat_scores, rtol=0, atol=1e-5)


def test_auto_switches_to_faiss_above_exact_max(pool, ids):
    assert RetrievalIndex(ids, pool, exact_max=N_ITEMS).backend == "torch"
    above = RetrievalIndex(ids, pool, exact_max=N_ITEMS - 1)
    assert above.backend == "faiss" and above.faiss_index.ntotal == N_ITEMS


def test_approximate_hnsw_finds_the_noisy_copy(pool, ids):
    index = RetrievalIndex(ids, pool, backend="faiss", faiss_factory="HNSW32")
    assert type(index.faiss_index).__name__ == "IndexHNSWFlat"
    results = index.search(_noisy_copies(pool, TARGETS, seed=4), k=3)
    assert [matches[0].id for matches in results] == [ids[t] for t in TARGETS]


def test_ivf_factory_is_trained_and_exhaustive_probing_matches_exact(pool, ids):
    import faiss

    index = RetrievalIndex(ids, pool, backend="faiss", faiss_factory="IVF4,Flat")
    assert index.faiss_index.is_trained and index.faiss_index.ntotal == N_ITEMS
    faiss.extract_index_ivf(index.faiss_index).nprobe = 4  # all lists: exact
    queries = _noisy_copies(pool, TARGETS, seed=5)
    exact = RetrievalIndex(ids, pool, backend="torch").search(queries, k=5)
    approximate = index.search(queries, k=5)
    assert [[m.id for m in row] for row in approximate] == [[m.id for m in row] for row in exact]


def test_many_queries_are_scored_in_chunks(pool, ids):
    n_queries = retrieval.QUERY_CHUNK + 7
    queries = torch.randn(n_queries, N_TOKENS * DIM, generator=torch.Generator().manual_seed(6))
    results = RetrievalIndex(ids, pool).search(queries, k=1)
    unit_pool = torch.nn.functional.normalize(pool.reshape(N_ITEMS, -1), dim=1)
    best = (torch.nn.functional.normalize(queries, dim=1) @ unit_pool.T).argmax(dim=1)
    assert len(results) == n_queries
    assert [row[0].id for row in results] == [ids[i] for i in best.tolist()]


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_save_load_round_trip(pool, ids, tmp_path, backend):
    index = RetrievalIndex(ids, pool, backend=backend, faiss_factory="Flat")
    directory = index.save(tmp_path / "pool")
    stored = sorted(path.name for path in directory.iterdir())
    assert stored == sorted(["index.json", "vectors.npy" if backend == "torch" else "index.faiss"])
    assert json.loads((directory / "index.json").read_text())["ids"] == ids
    loaded = RetrievalIndex.load(directory)
    assert (loaded.backend, loaded.ids, loaded.n_features) == (backend, tuple(ids), N_TOKENS * DIM)
    queries = _noisy_copies(pool, TARGETS, seed=7)
    assert loaded.search(queries, k=5) == index.search(queries, k=5)


def test_load_refuses_missing_or_inconsistent_files(pool, ids, tmp_path):
    with pytest.raises(ModelError, match="index.json"):
        RetrievalIndex.load(tmp_path / "nowhere")
    directory = RetrievalIndex(ids, pool, backend="torch").save(tmp_path / "pool")
    np.save(directory / "vectors.npy", np.ones((N_ITEMS - 1, N_TOKENS * DIM), dtype=np.float32))
    with pytest.raises(CheckpointError, match=r"manifest says float32 \(300, 120\)"):
        RetrievalIndex.load(directory)
    (directory / "vectors.npy").unlink()
    with pytest.raises(CheckpointError, match="vectors.npy"):
        RetrievalIndex.load(directory)
    (directory / "index.json").write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="not a retrieval index manifest"):
        RetrievalIndex.load(directory)


def test_duplicate_and_miscounted_ids_are_refused(pool, ids):
    with pytest.raises(ModelError, match=r"repeated: \['img0001'\]"):
        RetrievalIndex([*ids[:-1], "img0001"], pool)
    with pytest.raises(ModelError, match="299 ids for 300 embeddings"):
        RetrievalIndex(ids[:-1], pool)
    with pytest.raises(ModelError, match="must be strings"):
        RetrievalIndex(list(range(N_ITEMS)), pool)


def test_k_outside_the_pool_is_an_error_not_clamped(pool, ids):
    index = RetrievalIndex(ids, pool)
    queries = _noisy_copies(pool, [1])
    assert len(index.search(queries, k=N_ITEMS)[0]) == N_ITEMS
    for k in (N_ITEMS + 1, 0):
        with pytest.raises(ModelError, match=r"k must be an integer from 1 to the pool size 300"):
            index.search(queries, k=k)


def test_bad_queries_and_embeddings_are_refused(pool, ids):
    index = RetrievalIndex(ids, pool)
    with pytest.raises(ModelError, match="queries flatten to 100 features per query .* the pool's embeddings have 120"):
        index.search(torch.randn(2, 5, DIM))
    with pytest.raises(ModelError, match="needs its batch axis"):
        index.search(torch.randn(N_TOKENS * DIM))
    with pytest.raises(ModelError, match=r"queries rows \[1\] are all zero or non-finite"):
        index.search(torch.stack([pool[0], torch.zeros(N_TOKENS, DIM)]))
    with pytest.raises(ModelError, match=r"embeddings rows \[2\]"):
        RetrievalIndex(ids[:3], torch.tensor([[1.0, 0.0], [0.0, 1.0], [float("nan"), 1.0]]))
    with pytest.raises(ModelError, match="backend must be one of"):
        RetrievalIndex(ids, pool, backend="annoy")


def test_bad_faiss_factory_is_a_model_error(pool, ids):
    with pytest.raises(ModelError, match="faiss_factory 'NotAnIndex'"):
        RetrievalIndex(ids, pool, backend="faiss", faiss_factory="NotAnIndex")
