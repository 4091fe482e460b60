"""A byte-level BPE tokenizer learnt from the Python standard library, for synth checkpoints.

Byte-level, like Phi-4's: every string round-trips, and ONNX Runtime GenAI reads it as GPT-2 BPE.
"""

from __future__ import annotations

from functools import lru_cache

from phiedge.checkpoints.corpus import stdlib_files

TRAIN_BYTES = 4_000_000  # enough text for 32k merges in seconds


@lru_cache(maxsize=8)
def _trained(n_bpe: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_bpe, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(p) for p in stdlib_files(TRAIN_BYTES)], trainer)
    return tok.to_str()


def train_tokenizer(n_bpe: int, special_tokens: list[str], text_tokens: tuple[str, ...] | list[str] = ()):
    """A BPE of n_bpe ids, then the added tokens after it, in order: special ones (decoding leaves them out)
    except text_tokens (decoding writes them out, as the published tokenizer marks them)."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_str(_trained(n_bpe))
    tok.add_tokens([AddedToken(t, special=t not in text_tokens, normalized=False) for t in special_tokens])
    return tok
