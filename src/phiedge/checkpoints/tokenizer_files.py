"""A checkpoint's tokenizer as phiedge reads it and ships it, where it is a GPT-2 style vocab.json and merges.txt.

onnxruntime-genai reads tokenizer.json. A folder may have only vocab.json, merges.txt and tokenizer_config.json
(what the slow tokenizers save; the copy of Phi-4-mini's published files in tests/fixtures lacks its
tokenizer.json). transformers then builds the fast tokenizer itself, for the builder as for phiedge, and that
conversion splits text with GPT-2's regex, where Phi-4-mini's published tokenizer.json splits with GPT-4o's
(digits in threes, case changes inside words): the same text would get other ids than the model was trained on.
The chat format of the checkpoint's variant says which pattern its published tokenizer.json uses
(`split_pattern`); `load` gives transformers' tokenizer that split (calibration, validation), and `apply` writes it
into the tokenizer.json the builder converted, as the published file has it: a Split before a ByteLevel that no
longer applies GPT-2's regex.
"""

from __future__ import annotations

from pathlib import Path

from phiedge import catalog
from phiedge.artifacts import TokenizerConversion
from phiedge.checkpoints.checkpoint import identify, read_config
from phiedge.errors import BuildError

FILE = "tokenizer.json"
VOCABULARY = ("vocab.json", "merges.txt")


def converted(checkpoint_dir: Path) -> bool:
    """Whether the folder's tokenizer is vocab.json and merges.txt without a tokenizer.json."""
    path = Path(checkpoint_dir)
    return not (path / FILE).is_file() and all((path / f).is_file() for f in VOCABULARY)


def split_pattern(variant: str | None) -> str | None:
    """The split regex of the published tokenizer of a catalog variant, where its chat format names one."""
    fmt = catalog.chat_format_of(variant)
    return fmt.split_pattern if fmt else None


def pre_tokenizer(pattern: str):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def load(checkpoint_dir: str | Path):
    """transformers' tokenizer of a checkpoint folder, splitting text as the tokenizer.json a build ships."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir), trust_remote_code=False)
    if converted(checkpoint_dir):
        variant, _ = identify(Path(checkpoint_dir), read_config(Path(checkpoint_dir)))
        pattern = split_pattern(variant.name if variant else None)
        if pattern:
            tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizer(pattern)
    return tokenizer


def apply(model_dir: Path, checkpoint_dir: Path, variant: str | None) -> TokenizerConversion | None:
    """Give the tokenizer.json the builder converted in model_dir the variant's split pattern; say what was done,
    or None when the checkpoint brought its own tokenizer.json (or a sentencepiece model)."""
    from tokenizers import Tokenizer

    if not converted(checkpoint_dir):
        return None
    pattern = split_pattern(variant)
    done = TokenizerConversion(converted_from=list(VOCABULARY), split_pattern=pattern,
                               split_from=f"chat format of {variant}" if pattern else
                               "GPT-2's (transformers' conversion)")
    if pattern is None:
        return done
    path = Path(model_dir) / FILE
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception for a missing or malformed file
        raise BuildError(f"{path}: the builder's tokenizer.json is missing or unreadable ({exc})") from None
    found = tokenizer.pre_tokenizer
    if type(found).__name__ != "ByteLevel" or not found.use_regex:
        raise BuildError(f"{path}: expected transformers' GPT-2 byte-level pre-tokenizer to replace, found "
                         f"{type(found).__name__}")
    tokenizer.pre_tokenizer = pre_tokenizer(pattern)
    tokenizer.save(str(path))
    return done
