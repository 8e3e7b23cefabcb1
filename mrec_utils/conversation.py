"""A small conversational recommender (chapter 11): free-text tastes, like/dislike answers, fast adaptation.

A turn is feedback on the last suggestion (:func:`parse_feedback`: "yes", "not for me", "4/5", 👍, "haven't seen it") or
a taste statement, embedded by a language model. Likes and dislikes are the support set of a per-user head, adapted in a
few SGD steps from a meta-learned start (:func:`adapt_head`); the next film is the best unseen one by
(:func:`score_items`) ``f_theta_u(z_i) + lambda * std(cos(s, x_i)) + mu * pop_i``. Each suggestion has a one-sentence
reason by the model, or a template from the film's text (:func:`template_reason`). :func:`respond` answers any string;
:func:`chat_widget` is the same loop in Jupyter or Colab. ``embed_fn`` and ``reason_fn`` can be any callables (tests use
tiny stand-ins).
"""

from __future__ import annotations

import html
import math
import re
import textwrap
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from . import meta

MAX_CHARS = 500  # user turns longer than this are truncated (the reply says so)
QUIT_WORDS = ("quit", "exit", "bye", "goodbye", "stop", "q")
HELP_WORDS = ("help", "?", "what can i say", "what can i say?")


@dataclass(frozen=True)
class ConversationSettings:
    """Chapter 11's settings, frozen on ml-latest-small (lambda, mu and the conversation's inner lr
    chosen there on validation users); the chapter prints them and reuses them on ml-100k."""

    min_ratings: int = 25  # catalogue: films with at least this many training ratings
    layers: int = 8  # text embeddings: mean pooling over the first 8 LM blocks (chapter 8, for cost)
    n_components: int = 64  # PCA features z_i of the head (heads.lm_item_features)
    d_proj: int = 32  # the head's hidden width (heads.UserHead)
    global_steps: int = 300  # Adam steps of the global like/dislike head
    meta_steps: int = 300  # MAML steps from the global head
    inner_steps: int = 2  # SGD steps per user, in meta-training and in the conversation
    meta_inner_lr: float = 0.3  # inner learning rate during meta-training
    prior_weight: float = 0.5  # lambda, weight of the statement prior
    popularity_weight: float = 16.0  # mu, weight of the standardised log popularity (chosen inside its grid, chapter 11)
    inner_lr: float = 0.3  # inner learning rate in the conversation
    n_turns: int = 10  # suggestions per simulated conversation
    n_first: int = 5  # a simulated user's opening statement comes from their first 5 ratings
    n_genres: int = 2  # ... naming their 2 most frequent liked genres


@dataclass
class ConvRecommender:
    """What every conversation shares. ``item_emb [n, d]``: unit item text embeddings, centred by subtracting ``center
    [d]`` from the normalised raw rows; ``head``: features ``[N, D]`` -> ``[N]`` logits, on ``head_features [n, D]``
    (default ``item_emb``), adapted from ``init`` (default: all its parameters; the others stay fixed);
    ``embed_fn(texts) -> [m, d]``: raw embeddings by the model of ``item_emb``; ``reason_fn(statement, liked_titles,
    item_text) -> str`` or None (template reasons); ``popularity [n]``: training rating counts."""

    item_ids: np.ndarray
    texts: list[str]
    titles: list[str]
    item_emb: Tensor
    center: Tensor
    head: nn.Module
    embed_fn: Callable[[list[str]], np.ndarray]
    init: dict[str, Tensor] | None = None
    head_features: Tensor | None = None
    reason_fn: Callable[[str, list[str], str], str | None] | None = None
    popularity: np.ndarray | None = None
    settings: ConversationSettings = field(default_factory=ConversationSettings)

    def __post_init__(self) -> None:
        self.item_ids = np.asarray(self.item_ids, dtype=np.int64)
        self.head_features = self.item_emb if self.head_features is None else self.head_features
        sizes = {len(self.item_ids), len(self.texts), len(self.titles), len(self.item_emb), len(self.head_features)}
        if len(sizes) != 1:
            raise ValueError(f"item_ids, texts, titles, item_emb and head_features must describe the same items, got lengths {sizes}.")
        self.init = {k: v.detach().clone() for k, v in self.head.named_parameters()} if self.init is None else self.init
        self.rows = {int(i): j for j, i in enumerate(self.item_ids)}

    def rows_of(self, item_ids: Sequence[int] | np.ndarray) -> list[int]:
        """Catalogue rows of the given item ids; ids outside the catalogue are dropped."""
        return [self.rows[int(i)] for i in np.atleast_1d(item_ids) if int(i) in self.rows]

    def embed_statements(self, texts: list[str]) -> Tensor:
        """``[m, d]`` unit embeddings of free-text statements, centred like the items."""
        raw = torch.as_tensor(np.asarray(self.embed_fn(texts), dtype=np.float64)).reshape(len(texts), -1)
        v = nn.functional.normalize(raw.to(self.center.dtype), dim=-1)
        return nn.functional.normalize(v - self.center, dim=-1)


@dataclass
class Conversation:
    """One user's session: statements so far and their mean embedding, catalogue rows ``rated``
    before (never suggested), ``shown`` in order, ``liked``/``disliked`` (the support set), ``unseen``,
    the ``last`` row suggested (what feedback refers to), the adapted ``params`` and the ``turns``."""

    statements: list[str] = field(default_factory=list)
    statement_emb: Tensor | None = None
    rated: set[int] = field(default_factory=set)
    shown: list[int] = field(default_factory=list)
    liked: list[int] = field(default_factory=list)
    disliked: list[int] = field(default_factory=list)
    unseen: list[int] = field(default_factory=list)
    last: int | None = None
    params: dict[str, Tensor] | None = None
    turns: list[tuple[str, str]] = field(default_factory=list)
    statement_sum: Tensor | None = field(default=None, repr=False)  # sum of the statements' unit embeddings


@dataclass
class Reply:
    """The answer to one turn: ``text``; ``kind`` (recommend, clarify, help, goodbye, exhausted); the
    suggestion (``item_id``, ``title``, ``reason`` and ``reason_source`` "lm" or "template"); what the
    turn was understood as (``feedback``: like, dislike, unseen or None)."""

    text: str
    kind: str
    item_id: int | None = None
    title: str | None = None
    reason: str | None = None
    feedback: str | None = None
    reason_source: str | None = None


# ----------------------------------------------------------------------------- adapt and score
def adapt_head(rec: ConvRecommender, liked: Sequence[int], disliked: Sequence[int]) -> dict[str, Tensor]:
    """``settings.inner_steps`` SGD steps from ``rec.init`` on ``{(z_i, 1): liked} ∪ {(z_i, 0): disliked}``
    (cross-entropy); no feedback: ``rec.init``."""
    rows = list(liked) + list(disliked)
    if not rows:
        return dict(rec.init)
    x = rec.head_features[torch.as_tensor(rows)]
    y = torch.cat([torch.ones(len(liked)), torch.zeros(len(disliked))])
    with torch.no_grad():
        return meta.inner_adapt(rec.head, rec.init, {}, x, y, loss_fn=meta.bce_loss_per_example,
                                steps=rec.settings.inner_steps, inner_lr=rec.settings.inner_lr)


def score_items(rec: ConvRecommender, params: Mapping[str, Tensor] | None, statement_emb: Tensor | None,
                use_head: bool = True) -> Tensor:
    """``[n]`` scores ``f_params(z_i) + lambda * std(cos(s, x_i)) + mu * pop_i`` (``params=None``: the
    initialisation; ``statement_emb=None``: no prior; ``use_head=False``: the prior only)."""
    s, x = torch.zeros(len(rec.item_emb)), rec.item_emb
    with torch.no_grad():
        if use_head:
            s = s + meta.functional_forward(rec.head, dict(rec.init if params is None else params), {},
                                            rec.head_features).reshape(-1)
            if rec.settings.popularity_weight and rec.popularity is not None:
                lp = np.log1p(np.asarray(rec.popularity, dtype=np.float64))  # standardised log counts
                s = s + float(rec.settings.popularity_weight) * torch.as_tensor((lp - lp.mean()) / max(lp.std(), 1e-12))
        if statement_emb is not None:
            c = x @ statement_emb
            s = s + float(rec.settings.prior_weight) * (c - c.mean()) / c.std().clamp_min(1e-12)
    return s


def best_unseen(scores: Tensor, exclude: set[int] | Sequence[int]) -> int | None:
    """The best row not in ``exclude`` (the first of equal scores), or None when none is left."""
    s = scores.clone()
    if len(exclude):
        s[torch.as_tensor(list(exclude))] = -math.inf
    return int(torch.argmax(s)) if torch.isfinite(s).any() else None


# ----------------------------------------------------------------------------- understanding the user
_POS_EMOJI = "👍👌💯❤♥😍🥰😀😃😄😁😊🙂🤩👏🔥⭐🌟✅"
_NEG_EMOJI = "👎😞😠😡🙁☹😒😴🥱💩❌🤮😖😣"
_UNSEEN = re.compile(
    r"\b(?:ha(?:ve|s)n'?t|have not|has not|never|not|didn'?t|did not|do not|don'?t|not yet)\s+"
    r"(?:seen|see|watched|watch|know|heard)\b|\b(?:skip|next|pass|another|something else|no idea|unseen|not seen)\b")
_NEG = re.compile(
    r"\b(?:no|nope|nah|not for me|not really|not my|didn'?t like|did not like|don'?t like|do not like|"
    r"didn'?t enjoy|did not enjoy|dislike[ds]?|hate[ds]?|hated|boring|awful|terrible|bad|meh|worst|"
    r"not (?:good|great|interested)|wasn'?t (?:good|great|for me)|thumbs down)\b")
_POS = re.compile(
    r"\b(?:yes|yeah|yep|yup|sure|ok(?:ay)?|liked|loved|like it|love it|liked it|enjoyed|great|good|"
    r"awesome|amazing|excellent|fantastic|brilliant|perfect|favou?rite|not bad|thumbs up|nice|cool)\b")
_RATINGS = [(re.compile(r"(\d+(?:[.,]\d+)?)\s*(?:/|out of|of)\s*(5|10)\b"), None),  # 4/5, 8 out of 10
            (re.compile(r"(\d(?:[.,]5)?)\s*stars?\b"), 5.0), (re.compile(r"^(\d(?:[.,]5)?)$"), 5.0)]


def _normalize_text(text: str) -> str:
    t = unicodedata.normalize("NFKC", text).replace("\u2019", "'").replace("\u2018", "'").lower()
    return re.sub(r"\s+", " ", t).strip()


def _rating_feedback(t: str) -> str | None:
    """Like when a rating is at least 80% of its scale (4 of 5 stars), else dislike; None: no rating."""
    for pattern, scale in _RATINGS:  # the last pattern, a bare number, never meets a star
        m = pattern.search(t)
        if m:
            value, top = float(m.group(1).replace(",", ".")), scale or float(m.group(2))
            if 0 <= value <= top:
                return "like" if value / top >= 0.8 else "dislike"
    if "★" in t:
        return "like" if t.count("★") >= 4 else "dislike"
    return None


def parse_feedback(text: str) -> str | None:
    """A reply to a suggestion as ``"like"``, ``"dislike"``, ``"unseen"`` or None (not feedback). Ratings: like at >=
    80% of the scale ("4/5", "8 out of 10", "4 stars", "★★★★", a bare "4.5"). Emoji alone count. Words count on the
    first clause only (up to ``.,;!?``), so "No. I prefer comedies" is a dislike and a new statement; a first clause of
    more than eight words is a statement unless it starts with yes/no. Negations win ("not good"), except "not bad"."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}.")
    t = _normalize_text(text)
    if not t:
        return None
    pos_e, neg_e = sum(t.count(e) for e in _POS_EMOJI), sum(t.count(e) for e in _NEG_EMOJI)
    if (pos_e or neg_e) and pos_e != neg_e and not any(ch.isalpha() for ch in t):
        return "like" if pos_e > neg_e else "dislike"
    rated = _rating_feedback(t)
    if rated is not None:
        return rated
    first = re.split(r"[.;!?,]", t, maxsplit=1)[0].strip() or t
    words = first.split()
    if len(words) > 8 and words[0] not in ("yes", "no", "nope", "yeah", "yep", "nah"):
        return None
    for pattern, label in ((_UNSEEN, "unseen"), (re.compile(r"\bnot bad\b"), "like"), (_NEG, "dislike"), (_POS, "like")):
        if pattern.search(first):
            return label
    return None if pos_e == neg_e else ("like" if pos_e > neg_e else "dislike")


def _has_words(text: str) -> bool:
    return sum(ch.isalpha() for ch in text) >= 2


def _mostly_non_latin(text: str) -> bool:
    letters = [ch for ch in text if ch.isalpha()]
    return bool(letters) and sum("LATIN" in unicodedata.name(ch, "") for ch in letters) / len(letters) < 0.5


# ----------------------------------------------------------------------------- reasons
def _item_facts(item_text: str) -> tuple[str, list[str], list[str]]:
    """``"Title (1995). Genres: A, B. Tags: x, y."`` -> (head, genres, tags)."""
    head = item_text.split(". Genres:")[0].split(". Tags:")[0].strip().rstrip(".")
    g, tg = re.search(r"Genres: ([^.]*)\.", item_text), re.search(r"Tags: ([^.]*)\.?", item_text)
    return head, [s.strip() for s in g.group(1).split(",") if s.strip()] if g else [], \
        [s.strip() for s in tg.group(1).split(",") if s.strip()] if tg else []


def template_reason(item_text: str, statement: str = "", liked_titles: Sequence[str] = ()) -> str:
    """A reason built only from the film's text, e.g. "Toy Story (1995) is an Adventure, Animation and
    Comedy film tagged pixar, fun, close to what you asked for." (the fallback for the model's)."""
    head, genres, tags = _item_facts(item_text)
    g = genres[:3]
    what = (f" is a{'n' if g[0][0].lower() in 'aeiou' else ''} " + (g[0] if len(g) == 1 else ", ".join(g[:-1]) + " and "
            + g[-1]) + " film") if g else " is a film"
    what += " tagged " + ", ".join(tags[:3]) if tags else ""
    why = (f", in the spirit of {liked_titles[-1]}, which you liked" if liked_titles
           else ", close to what you asked for" if statement.strip() else "")
    return f"{head}{what}{why}."


_META_TALK = ("as an ai", "this is an example", "rephrase", "i'm sorry", "i am sorry", "i cannot",
              "language model", "instruction", "the prompt")


_ABBREVIATION = re.compile(r"\b(?:Dr|Mr|Mrs|Ms|St|Jr|Sr|Mt|Inc|Co|Ltd|vs|Vol|No|[A-Z])\.$")  # a full stop that ends no sentence


def clean_reason(raw: object, item_text: str = "", max_chars: int = 240) -> str | None:
    """One clean sentence from the model's output, or None when it is unusable: markup and quotes
    stripped, the first sentence of at least four words, at most ``max_chars``; rejected when it has
    fewer than four words, mostly non-letters, fewer than half its words distinct, is a copy of the
    item text, ends in "because", or talks about the task ("this is an example", "as an AI")."""
    if not isinstance(raw, str):
        return None
    t = re.sub(r"<[^>]*>|[*_#`]+", " ", raw)
    t = re.sub(r"^\s*(?:reason|answer|explanation|assistant)\s*:\s*", "", t, flags=re.I)
    t = re.sub(r"\s+", " ", t).strip().strip("\"'“”").strip()
    sentences: list[str] = []
    for piece in (p.strip() for p in re.split(r"(?<=[.!?])\s+", t) if p.strip()):
        if sentences and _ABBREVIATION.search(sentences[-1]):  # "Dr. Strangelove" is one sentence
            sentences[-1] += " " + piece
        else:
            sentences.append(piece)
    first = ""
    for s in sentences:
        first = f"{first} {s}".strip()
        if len(first.split()) >= 4:
            break
    if not first:
        return None
    if len(first) > max_chars:
        first = first[:max_chars].rsplit(" ", 1)[0].rstrip(",;:") + "."
    first += "" if first[-1] in ".!?" else "."
    words, chars = re.findall(r"[^\W\d_]+", first.lower()), [c for c in first if not c.isspace()]
    low = first.lower()
    if (len(words) < 4 or sum(c.isalpha() for c in chars) / len(chars) < 0.6 or len(set(words)) / len(words) < 0.5
            or (item_text and _normalize_text(first).strip(".") == _normalize_text(item_text).strip("."))
            or low.rstrip(".").endswith(" because") or any(bad in low for bad in _META_TALK)):
        return None
    return first[0].upper() + first[1:]


def _reason(rec: ConvRecommender, session: Conversation, row: int) -> tuple[str, str]:
    statement, liked = " ".join(session.statements), [rec.titles[r] for r in session.liked]
    if rec.reason_fn is not None:
        try:
            cleaned = clean_reason(rec.reason_fn(statement, liked, rec.texts[row]), rec.texts[row])
        except (ValueError, RuntimeError):  # e.g. a prompt longer than the model's context
            cleaned = None
        if cleaned is not None:
            return cleaned, "lm"
    return template_reason(rec.texts[row], statement, liked), "template"


# ----------------------------------------------------------------------------- one turn
_HELP = ("Tell me in a sentence what you like (e.g. 'I like funny animated films'). After each suggestion, "
         "answer 'yes' / 'no' / 'haven't seen it' (or a rating like 4/5, or 👍/👎); I adapt to each answer. "
         "Say 'quit' to stop.")


def _add_statement(rec: ConvRecommender, session: Conversation, text: str) -> None:
    v = rec.embed_statements([text])[0]
    session.statement_sum = v if session.statement_sum is None else session.statement_sum + v
    session.statement_emb = nn.functional.normalize(session.statement_sum, dim=0)
    session.statements.append(text)


def _record(session: Conversation, label: str) -> None:
    if session.last is not None:
        {"like": session.liked, "dislike": session.disliked}.get(label, session.unseen).append(session.last)
        session.last = None


def _recommend(rec: ConvRecommender, session: Conversation, prefix: str, feedback: str | None, with_reason: bool) -> Reply:
    session.params = adapt_head(rec, session.liked, session.disliked)
    row = best_unseen(score_items(rec, session.params, session.statement_emb), session.rated | set(session.shown))
    if row is None:
        return Reply((prefix + "I have nothing left to recommend from my catalogue.").strip(), "exhausted", feedback=feedback)
    session.shown.append(row)
    session.last = row
    reason, source = _reason(rec, session, row) if with_reason else (template_reason(rec.texts[row]), "template")
    text = f"{prefix}How about {rec.titles[row]}? {reason} Did you like it (or haven't you seen it)?"
    return Reply(text.strip(), "recommend", int(rec.item_ids[row]), rec.titles[row], reason, feedback, source)


def _ask(rec: ConvRecommender, session: Conversation, otherwise: str) -> str:
    if session.last is None:
        return otherwise
    return f"Did you like {rec.titles[session.last]}? Answer yes, no or haven't seen it."


def _respond(rec: ConvRecommender, session: Conversation, user_turn: str, with_reason: bool) -> Reply:
    text = "".join(ch for ch in user_turn if ch.isprintable() or ch in "\n\t").strip()
    prefix = ""
    if len(text) > MAX_CHARS:
        text = text[:MAX_CHARS].rsplit(" ", 1)[0] if " " in text[:MAX_CHARS] else text[:MAX_CHARS]
        prefix = f"(That was long; I read the first {len(text)} characters.) "
    norm = _normalize_text(text)
    if not norm:
        ask = _ask(rec, session, "Tell me what kind of movies you like, e.g. 'I like funny animated films'.")
        return Reply(f"I didn't catch anything there. {ask}", "clarify")
    if norm.strip(".! ") in QUIT_WORDS:
        return Reply(f"Goodbye! I suggested {len(session.shown)} movies and you liked {len(session.liked)} of them.", "goodbye")
    if norm in HELP_WORDS:
        return Reply(_HELP, "help")
    label = parse_feedback(text) if session.last is not None else None
    if label is not None:
        _record(session, label)
        ack = {"like": "Great, noted. ", "dislike": "OK, noted: not that. ", "unseen": "No problem. "}[label]
        parts = re.split(r"(?<=[.;!?,])\s*", text.strip(), maxsplit=1)  # "No. Something lighter": also a statement
        rest = parts[1].strip() if len(parts) == 2 else ""
        if rest and len(rest.split()) >= 3 and _has_words(rest) and parse_feedback(rest) is None:
            _add_statement(rec, session, rest)
        return _recommend(rec, session, prefix + ack, label, with_reason)
    if session.last is None and not session.statements and parse_feedback(text) is not None:
        return Reply(prefix + "I haven't suggested anything yet. " + _HELP.split(". After")[0] + ".", "clarify")
    if not _has_words(text):
        ask = _ask(rec, session, "Could you describe in words what kind of movies you like?")
        return Reply(prefix + f"I couldn't find any words in that. {ask}", "clarify")
    if _mostly_non_latin(text):
        prefix += "I work best in English, but I'll try. "
    _record(session, "unseen")  # a new statement instead of an answer: the last film got no feedback
    _add_statement(rec, session, text)
    return _recommend(rec, session, prefix, None, with_reason)


def respond(rec: ConvRecommender, session: Conversation, user_turn: str, *, with_reason: bool = True) -> Reply:
    """Answer one turn of the user and update ``session`` in place; any string gets a sensible reply. Empty or
    letter-less text: a clarifying question. ``quit``: goodbye with a summary; ``help``: how to talk to it. Feedback on
    the last suggestion (:func:`parse_feedback`): recorded, the head re-adapted from its initialisation, the next film
    suggested ("No. Something lighter please" is also a statement). Anything else is a taste statement (averaged with
    earlier ones). Over :data:`MAX_CHARS` characters: truncated, and the reply says so; mostly non-Latin script: the
    reply says the model works best in English. ``with_reason=False`` skips the model's reason (template). TypeError
    when ``user_turn`` is not a str (e.g. None from a broken input widget)."""
    if not isinstance(user_turn, str):
        raise TypeError(f"user_turn must be a str, got {type(user_turn).__name__}.")
    reply = _respond(rec, session, user_turn, with_reason)
    session.turns.append((user_turn, reply.text))
    return reply


def run_script(rec: ConvRecommender, turns: Sequence[str], session: Conversation | None = None, *,
               with_reason: bool = True) -> list[tuple[str, Reply]]:
    """Play a fixed list of user turns; ``(user_turn, Reply)`` pairs, up to a goodbye."""
    session, out = Conversation() if session is None else session, []
    for t in turns:
        out.append((t, respond(rec, session, t, with_reason=with_reason)))
        if out[-1][1].kind == "goodbye":
            break
    return out


def _shown(user: str) -> str:
    return user if len(user) <= 80 else user[:77] + "..."


def format_transcript(pairs: Sequence[tuple[str, Reply | str]], width: int = 100) -> str:
    """``user> ...`` / ``bot>  ...`` lines, long user turns shortened, lines wrapped at ``width``."""
    lines = []
    for user, reply in pairs:
        lines.append(textwrap.fill(f"user> {_shown(user)}", width, subsequent_indent="      "))
        lines.append(textwrap.fill(f"bot>  {getattr(reply, 'text', reply)}", width, subsequent_indent="      "))
    return "\n".join(lines)


def chat_widget(rec: ConvRecommender, session: Conversation | None = None, *, with_reason: bool = True):
    """The conversation as an ipywidgets app (Jupyter, Colab): a text box, a Send button, the transcript
    and the suggestions so far with the user's answers. Returns the ``VBox``; its attributes ``text``,
    ``send``, ``transcript``, ``recommendations`` (widgets) and ``session`` let code drive it."""
    import ipywidgets as w

    session = Conversation() if session is None else session
    text = w.Text(placeholder="What do you like? Or answer yes / no / haven't seen it, then press Send.",
                  layout=w.Layout(width="75%"))
    send = w.Button(description="Send", button_style="primary")
    transcript, recommendations = w.HTML(), w.HTML()  # filled by render()

    def render() -> None:
        transcript.value = f"<b>bot</b>: Hi! {html.escape(_HELP)}" + "".join(
            f"<br><b>you</b>: {html.escape(_shown(u))}<br><b>bot</b>: {html.escape(b)}" for u, b in session.turns)
        answer = {**{r: "not seen" for r in session.unseen}, **{r: "liked" for r in session.liked},
                  **{r: "disliked" for r in session.disliked}}
        recommendations.value = "<b>Suggestions so far</b><ol>" + "".join(
            f"<li>{html.escape(rec.titles[r])}: {answer.get(r, 'waiting for your answer')}</li>" for r in session.shown) + "</ol>"

    def on_send(_: object = None) -> None:
        turn, text.value = text.value, ""
        respond(rec, session, turn, with_reason=with_reason)
        render()

    send.on_click(on_send)
    render()
    box = w.VBox([transcript, w.HBox([text, send]), recommendations])
    box.text, box.send, box.transcript, box.recommendations, box.session = text, send, transcript, recommendations, session
    return box
