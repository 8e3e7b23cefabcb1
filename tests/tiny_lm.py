"""A tiny random-initialised causal LM with a character tokenizer, for fast unit tests.

Shared by ``test_lm.py`` and ``test_conversation.py`` (imported as a plain module: pytest puts
this folder on ``sys.path``). Not a test file itself.
"""

from __future__ import annotations

import string

import torch

from mrec_utils.lm import LoadedLM


def char_tokenizer(padding_side: str = "right"):
    """A ``PreTrainedTokenizerFast`` with one token per printable character plus pad/unk/eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    for c in string.printable[:95]:
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    tok.padding_side = padding_side
    return tok


def tiny_lm(seed: int = 0, n_layer: int = 2, name: str = "tiny", n_embd: int = 32, n_positions: int = 128,
            padding_side: str = "right") -> LoadedLM:
    """A ``GPT2LMHeadModel`` (``n_layer`` blocks of width ``n_embd``, 2 heads) in eval mode on the CPU,
    weights drawn with ``torch.manual_seed(seed)``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = char_tokenizer(padding_side)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=2,
                     bos_token_id=2, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return LoadedLM(name, GPT2LMHeadModel(cfg).eval(), tok, torch.device("cpu"))
