"""Tests of mrec_utils.conversation (chapter 11's conversational recommender) and its chat widget.

Fast stand-ins: a deterministic bag-of-words text embedder (each word a fixed random vector) and a
tiny random GPT-2 with an in-memory character tokenizer for the language-model path. The simulated
users and the simulation loop live in chapter 11 (its checked cells).
"""

from __future__ import annotations

import html
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch

from mrec_utils import conversation as C
from mrec_utils import lm, meta
from tiny_lm import tiny_lm  # tests/tiny_lm.py

from mrec_utils.conversation import (
    ConvRecommender,
    Conversation,
    ConversationSettings,
    adapt_head,
    clean_reason,
    parse_feedback,
    respond,
    run_script,
    score_items,
    template_reason,
)

DIM = 24
GENRES = ["Horror", "Comedy", "Romance", "Drama", "Animation", "Thriller"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class LinearHead(torch.nn.Module):
    """logit = w . x + b, input [N, d] -> [N]."""

    def __init__(self, dim: int):
        super().__init__()
        self.out = torch.nn.Linear(dim, 1)

    def forward(self, x):
        return self.out(x).squeeze(-1)


def word_vec(word: str) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(word.encode()))
    return rng.standard_normal(DIM).astype(np.float64)


def bow_embed(texts):
    """Deterministic stand-in for an LM embedder: sum of per-word random vectors."""
    out = []
    for t in texts:
        words = [w for w in "".join(c.lower() if c.isalnum() else " " for c in t).split() if w]
        out.append(np.sum([word_vec(w) for w in words], axis=0) if words else np.full(DIM, 1e-3, np.float64))
    return np.stack(out).astype(np.float64)


def make_catalog(n: int = 18):
    ids = np.arange(100, 100 + n, dtype=np.int64)
    titles = [f"Movie {i} ({1980 + i})" for i in range(n)]
    texts = [f"{titles[i]}. Genres: {GENRES[i % len(GENRES)]}, {GENRES[(i + 2) % len(GENRES)]}." for i in range(n)]
    return ids, titles, texts


def center_embeddings(raw):
    """As chapter 11 centres the item embeddings: unit rows minus their mean, re-normalised."""
    r = torch.nn.functional.normalize(torch.as_tensor(raw), dim=1)
    return torch.nn.functional.normalize(r - r.mean(0), dim=1), r.mean(0)


SETTINGS = replace(ConversationSettings(), prior_weight=2.0, popularity_weight=0.0, inner_lr=1.0, inner_steps=2)


def make_rec(n: int = 18, reason_fn=None, prior_weight: float = 2.0, head=None) -> ConvRecommender:
    ids, titles, texts = make_catalog(n)
    x, center = center_embeddings(bow_embed(texts))
    torch.manual_seed(0)
    head = LinearHead(DIM) if head is None else head
    return ConvRecommender(ids, texts, titles, x, center, head, bow_embed, reason_fn=reason_fn,
                           popularity=np.arange(n, 0, -1).astype(np.float64),
                           settings=replace(SETTINGS, prior_weight=prior_weight))


def stub_reason(statement, liked, item_text):
    return f"It fits because {item_text.split('. ')[0]} matches what you said. Extra sentence here."


SCRIPT = [
    "Hi! I like scary Horror movies with a Thriller edge.",
    "yes, I liked it",
    "not for me",
    "haven't seen it",
    "👍",
    "4/5",
    "No. Something with Romance please",
    "quit",
]


# ------------------------------------------------------------------------------------------------
# feedback parsing
# ------------------------------------------------------------------------------------------------

FEEDBACK_TABLE = [
    ("yes", "like"), ("Yes!", "like"), ("yeah, loved it", "like"), ("I liked it", "like"),
    ("I really enjoyed it", "like"), ("not bad", "like"), ("👍", "like"), ("😍😍", "like"),
    ("4/5", "like"), ("8 out of 10", "like"), ("4.5 stars", "like"), ("★★★★", "like"), ("5", "like"),
    ("no", "dislike"), ("No.", "dislike"), ("not for me", "dislike"), ("I didn't like it", "dislike"),
    ("didn’t like it", "dislike"), ("meh", "dislike"), ("it was boring", "dislike"), ("not good", "dislike"),
    ("👎", "dislike"), ("2/5", "dislike"), ("3 stars", "dislike"), ("6/10", "dislike"), ("★★", "dislike"),
    ("3", "dislike"),
    ("haven't seen it", "unseen"), ("I have not seen it", "unseen"), ("never watched it", "unseen"),
    ("skip", "unseen"), ("next", "unseen"), ("don't know it", "unseen"),
    ("", None), ("   ", None), ("I like quiet dramas about families", None), ("Horror", None),
    ("I like films with strong female leads and great soundtracks from the eighties", None),
    ("🎬🍿", None),
]


@pytest.mark.parametrize("text,expected", FEEDBACK_TABLE)
def test_parse_feedback_table(text, expected):
    assert parse_feedback(text) == expected


def test_parse_feedback_rejects_non_str():
    with pytest.raises(TypeError):
        parse_feedback(None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------


def _replies(rec):
    return [(r.text, r.kind, r.item_id, r.feedback) for _, r in run_script(rec, SCRIPT)]


def test_scripted_dialogue_is_deterministic_and_understands_turns():
    a = _replies(make_rec(reason_fn=stub_reason))
    b = _replies(make_rec(reason_fn=stub_reason))
    assert a == b
    kinds = [k for _, k, _, _ in a]
    assert kinds == ["recommend"] * 7 + ["goodbye"]
    assert [f for _, _, _, f in a] == [None, "like", "dislike", "unseen", "like", "like", "dislike", None]
    assert "You liked 3" in a[-1][0] or "liked 3" in a[-1][0]
    # the LM-style reason was cleaned to one sentence
    assert "Extra sentence" not in a[0][0] and "It fits because Movie" in a[0][0]


def test_statement_drives_retrieval():
    rec = make_rec(prior_weight=50.0)  # the statement dominates a random head
    r = respond(rec, Conversation(), "Horror Horror Horror")
    assert "Horror" in rec.texts[rec.rows_of([r.item_id])[0]]


def test_never_recommends_rated_or_shown_until_exhausted():
    rec = make_rec(n=12)
    rated = rec.item_ids[[0, 5, 7]]
    session = Conversation(rated=set(rec.rows_of(rated)))
    turns = ["I like Comedy"] + ["no", "yes", "haven't seen it"] * 4
    pairs = run_script(rec, turns, session)
    recs = [r.item_id for _, r in pairs if r.kind == "recommend"]
    assert len(recs) == len(set(recs)) == 12 - 3
    assert not set(recs) & set(rated.tolist())
    assert pairs[-1][1].kind == "exhausted"


def test_new_statement_instead_of_answer_keeps_shown_excluded():
    rec = make_rec()
    s = Conversation()
    first = respond(rec, s, "I like Horror").item_id
    second = respond(rec, s, "I like Horror").item_id
    assert first != second and s.unseen == rec.rows_of([first])


@pytest.mark.parametrize(
    "turn,kind,needle",
    [
        ("", "clarify", "didn't catch"),
        ("   \n\t ", "clarify", "didn't catch"),
        ("🎬🍿🎥", "clarify", "couldn't find any words"),
        ("?", "help", "quit"),
        ("yes", "clarify", "haven't suggested anything"),
        ("Ich mag Horrorfilme und Komödien", "recommend", "How about"),
        ("我喜欢恐怖电影", "recommend", "best in English"),
        ("Мне нравятся комедии", "recommend", "best in English"),
    ],
)
def test_malformed_input_gets_sensible_reply(turn, kind, needle):
    rec = make_rec(reason_fn=stub_reason)
    r = respond(rec, Conversation(), turn)
    assert r.kind == kind and needle in r.text


def test_very_long_input_is_truncated():
    rec = make_rec()
    seen = []
    rec.embed_fn = lambda texts: (seen.extend(texts), bow_embed(texts))[1]
    r = respond(rec, Conversation(), "I like Horror " * 400)  # 5,600 characters
    assert r.kind == "recommend" and "That was long" in r.text
    assert seen and max(len(t) for t in seen) <= C.MAX_CHARS


def test_emoji_after_recommendation_is_feedback_and_non_str_is_typeerror():
    rec = make_rec()
    s = Conversation()
    respond(rec, s, "I like Comedy")
    assert respond(rec, s, "👎").feedback == "dislike" and len(s.disliked) == 1
    assert respond(rec, s, "").kind == "clarify" and s.last is not None  # asks about the last movie
    with pytest.raises(TypeError):
        respond(rec, s, None)  # type: ignore[arg-type]


def test_non_str_reason_output_and_errors_fall_back_to_template():
    def broken(statement, liked, text):
        raise ValueError("prompt too long")

    for fn in (broken, lambda *a: "", lambda *a: "!!!! ???? ....", lambda *a: "the the the the the the"):
        r = respond(make_rec(reason_fn=fn), Conversation(), "I like Horror")
        assert r.reason_source == "template" and r.reason.endswith(".") and r.title.split(" (")[0] in r.reason


# ------------------------------------------------------------------------------------------------
# adaptation
# ------------------------------------------------------------------------------------------------


def test_like_raises_similar_items_and_dislike_lowers_them():
    rec = make_rec()
    a = 3
    x = rec.item_emb
    sim = (x @ x[a]).numpy()
    base = score_items(rec, None, None).numpy()
    after_like = score_items(rec, adapt_head(rec, [a], []), None).numpy()
    after_dislike = score_items(rec, adapt_head(rec, [], [a]), None).numpy()
    up = after_like - base
    # for a linear head, one SGD step on (x_a, 1) moves every score by lr * (1 - p_a) * (x_i . x_a + 1)
    assert up[a] > 0 and (after_dislike - base)[a] < 0
    assert np.corrcoef(up, sim)[0, 1] > 0.99
    assert np.corrcoef(after_dislike - base, sim)[0, 1] < -0.99


def test_adapt_head_matches_hand_written_sgd():
    rec = make_rec()
    liked, disliked = [1, 4], [2]
    w = rec.init["out.weight"].clone().reshape(-1)
    b = rec.init["out.bias"].clone().reshape(())
    xs = rec.item_emb[liked + disliked]
    y = torch.tensor([1.0, 1.0, 0.0])
    for _ in range(rec.settings.inner_steps):
        p = torch.sigmoid(xs @ w + b)
        g = (p - y) / len(y)
        w, b = w - rec.settings.inner_lr * (xs.T @ g), b - rec.settings.inner_lr * g.sum()
    got = adapt_head(rec, liked, disliked)
    assert torch.allclose(got["out.weight"].reshape(-1), w, atol=1e-6)
    assert torch.allclose(got["out.bias"].reshape(()), b, atol=1e-6)
    assert adapt_head(rec, [], []) == rec.init


def test_statements_are_centred_like_the_items():
    rec = make_rec()
    # a film's own text as a statement lands on the film's row: same model, same centring
    assert torch.allclose(rec.embed_statements(rec.texts[:3]), rec.item_emb[:3], atol=1e-12)
    assert torch.allclose(rec.embed_statements(["Horror"]).norm(dim=1), torch.ones(1))


def test_only_the_init_parameters_adapt_and_head_features_are_used():
    from mrec_utils.heads import UserHead

    rec0 = make_rec()
    feats = torch.randn(len(rec0.item_ids), 7, generator=torch.Generator().manual_seed(1))
    head = UserHead(7, d_proj=5)
    init = {k: v.detach().clone() for k, v in head.named_parameters() if k.startswith("head")}
    rec = ConvRecommender(rec0.item_ids, rec0.texts, rec0.titles, rec0.item_emb, rec0.center, head, bow_embed,
                          head_features=feats, init=init, settings=SETTINGS)
    body = {k: v.detach().clone() for k, v in head.named_parameters() if k.startswith("body")}
    p = adapt_head(rec, [0, 1], [2])
    assert set(p) == set(init) and any(not torch.equal(p[k], init[k]) for k in init)
    assert all(torch.equal(v, dict(head.named_parameters())[k]) for k, v in body.items())
    with torch.no_grad():
        expected = meta.functional_forward(head, p, {}, feats)
    assert torch.allclose(score_items(rec, p, None), expected)
    with pytest.raises(ValueError):
        ConvRecommender(rec0.item_ids, rec0.texts, rec0.titles, rec0.item_emb, rec0.center, head, bow_embed,
                        head_features=feats[:3])


# ------------------------------------------------------------------------------------------------
# reasons
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw,ok",
    [
        ("It is a funny animated film. It also has songs.", "It is a funny animated film."),
        ('"**Because** you like comedies, this fits"', "Because you like comedies, this fits."),
        ("", None), (None, None), ("ok.", None), ("1995 1995 1995 1995 ...", None),
        ("good good good good good good good", None),
        ("Toy Story (1995). Genres: Animation.", None),
        ("You might enjoy Toy Story (1995) because", None),
        ("This is an example of how to provide accurate information without inventing things.", None),
        ("You might enjoy Toy Story (1995) because it is a funny animated film.",
         "You might enjoy Toy Story (1995) because it is a funny animated film."),
        ("You might enjoy Dr. Strangelove (1964) because it is a sharp satire. It is old.",
         "You might enjoy Dr. Strangelove (1964) because it is a sharp satire."),
        ("You might enjoy Monsters, Inc. (2001) because of its jokes. More.",
         "You might enjoy Monsters, Inc. (2001) because of its jokes."),
    ],
)
def test_clean_reason(raw, ok):
    assert clean_reason(raw, "Toy Story (1995). Genres: Animation.") == ok


def test_clean_reason_caps_length():
    out = clean_reason("This film " + "is really very " * 40 + "good.", max_chars=100)
    assert out is None or len(out) <= 101


def test_template_reason_grounded_in_item_text():
    t = template_reason("Alien (1979). Genres: Horror, Sci-Fi. Tags: space, scary.", "I like horror", [])
    assert t == "Alien (1979) is a Horror and Sci-Fi film tagged space, scary, close to what you asked for."
    assert "Heat" in template_reason("Alien (1979). Genres: Horror.", "", ["Heat (1995)"])


def _tiny_lm():
    return tiny_lm(n_layer=1, n_embd=DIM, n_positions=1024, padding_side="left")


def test_with_a_tiny_lm_end_to_end_is_deterministic():
    model = _tiny_lm()

    def embed(texts):
        return lm.embed_texts(list(texts), model, use_cache=False, progress=False)

    def reason(statement, liked, item_text):
        return "You might enjoy it because " + lm.generate(model, item_text, max_new_tokens=4, chat=False)

    def build():
        ids, titles, texts = make_catalog(10)
        x, center = center_embeddings(embed(texts))
        torch.manual_seed(0)
        return ConvRecommender(ids, texts, titles, x, center, LinearHead(DIM), embed, reason_fn=reason)

    a = [(r.text, r.reason_source) for _, r in run_script(build(), SCRIPT[:3])]
    b = [(r.text, r.reason_source) for _, r in run_script(build(), SCRIPT[:3])]
    assert a == b and len(a) == 3


# ------------------------------------------------------------------------------------------------
# the chat widget (ipywidgets): type into the box, press Send
# ------------------------------------------------------------------------------------------------


def _say(app, text):
    app.text.value = text
    app.send.click()


def test_chat_widget_drives_the_loop_like_respond():
    rec = make_rec(reason_fn=stub_reason)
    app = C.chat_widget(rec)
    assert "Hi!" in app.transcript.value and app.session.turns == []
    for turn in SCRIPT:
        _say(app, turn)
        assert app.text.value == ""  # the box is cleared for the next turn
    expected = run_script(make_rec(reason_fn=stub_reason), SCRIPT)
    assert [b for _, b in app.session.turns] == [r.text for _, r in expected]
    shown = [rec.titles[r] for r in app.session.shown]
    assert shown == [r.title for _, r in expected if r.kind == "recommend"]
    for _, r in expected:  # every reply is in the transcript, escaped for HTML
        assert html.escape(r.text) in app.transcript.value
    items = app.recommendations.value.split("<li>")[1:]
    assert len(items) == 7 and items[0].startswith(html.escape(shown[0]) + ": liked")
    assert items[1].endswith(": disliked</li>") and items[2].endswith(": not seen</li>")
    assert items[-1].startswith(html.escape(shown[-1]) + ": waiting for your answer")  # "quit" answered nothing
    assert "Goodbye" in app.transcript.value


def test_chat_widget_bad_input():
    rec = make_rec(reason_fn=stub_reason)
    app = C.chat_widget(rec)
    _say(app, "")
    assert app.session.shown == [] and "didn&#x27;t catch anything" in app.transcript.value
    _say(app, "I like Horror " * 1000)  # 14,000 characters
    assert len(app.session.shown) == 1 and "That was long" in app.transcript.value
    assert ("I like Horror " * 6)[:77] + "..." in app.transcript.value and len(app.transcript.value) < 3000
    _say(app, "<b>no</b>")  # markup is shown as text, not rendered
    assert "&lt;b&gt;no&lt;/b&gt;" in app.transcript.value and len(app.session.disliked) == 1
    _say(app, "   ")
    assert "Did you like" in app.session.turns[-1][1] and len(app.session.shown) == 2
    with pytest.raises(TypeError):
        respond(rec, app.session, None)  # type: ignore[arg-type]


def test_popularity_term_is_standardised_log_counts_and_statement_only_drops_head_and_popularity():
    rec = make_rec(n=12)
    base = score_items(rec, None, None)
    rec2 = make_rec(n=12)
    rec2.settings = replace(rec2.settings, popularity_weight=0.5)
    lp = np.log1p(rec.popularity.astype(np.float64))
    z = (lp - lp.mean()) / lp.std()
    assert np.allclose(score_items(rec2, None, None).numpy() - base.numpy(), 0.5 * z, atol=1e-12)
    s = rec.embed_statements(["Horror"])[0]
    c = (rec.item_emb @ s).numpy()
    expected = rec.settings.prior_weight * (c - c.mean()) / c.std(ddof=1)
    assert np.allclose(score_items(rec2, None, s, use_head=False).numpy(), expected, atol=1e-12)


def test_mismatched_catalogue_is_refused():
    rec = make_rec()
    with pytest.raises(ValueError, match="same items"):
        ConvRecommender(rec.item_ids, rec.texts[:-1], rec.titles, rec.item_emb, rec.center, rec.head, bow_embed)
