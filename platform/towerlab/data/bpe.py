"""CLIP's byte-level BPE tokenizer (49,408 tokens), the dataset-independent tokenizer of text towers trained from
scratch (`model.text.tokenizer: clip_bpe`).

Why: the word vocabulary (data/tokenizer.py) is built from the training captions, so a class name the captions never
used becomes `<unk>` and zero-shot transfer to new classes cannot work; and foreign corpora (img2dataset shards) come
with no vocabulary at all. CLIP's BPE covers every byte sequence, so no token is unknown.

The vocabulary is the merges file that ships inside the open-clip-torch wheel (`open_clip/bpe_simple_vocab_16e6.txt.gz`),
found without importing open_clip (which needs torchvision). From it we build a Hugging Face `tokenizers` pipeline
laid out as transformers' CLIPTokenizer (NFC + whitespace + lowercase normalizer, CLIP's split regex, byte-level
pre-tokenizer, BPE with the `</w>` end-of-word suffix) and cache it as one tokenizer.json under the user's cache
directory (written atomically; keyed by the vocabulary file's sha256), so workers load it in milliseconds.

Ids follow OpenCLIP's `tokenize`: <start_of_text> (49406), the caption's tokens, <end_of_text> (49407), padded with 0
to the context length; a caption too long is truncated and its last kept position becomes <end_of_text>. Text is
cleaned first as OpenCLIP's SimpleTokenizer does (ftfy, HTML unescaping twice, whitespace collapsed, lowercase).
One deliberate difference: the literal strings "<start_of_text>"/"<end_of_text>" inside a caption are ordinary
text here, never the special ids (a caption could otherwise plant an early EOT, where the text tower pools).
tests/unit/data/test_bpe.py checks token for token against open_clip's own SimpleTokenizer.
"""

from __future__ import annotations

import gzip
import functools
import hashlib
import html
import importlib.util
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from towerlab.config.errors import ConfigError
from towerlab.util import atomic_write

VOCAB_SIZE = 49408
SOT, EOT = 49406, 49407
SPECIALS = ["<start_of_text>", "<end_of_text>"]
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# the merges OpenAI's CLIP uses: lines 1 .. 48894 of the file (49152 - 256 bytes - 2 specials), as SimpleTokenizer
N_MERGES = 49152 - 256 - 2
SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
INSTALL_HINT = "pip install --no-deps open-clip-torch (or `make setup`), which ships CLIP's BPE vocabulary"


def vocab_file() -> Path:
    """The BPE merges file inside the installed open-clip-torch wheel (located, not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.text.tokenizer=clip_bpe needs the open-clip-torch package: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / VOCAB_FILE
    if not path.is_file():
        raise ConfigError(f"model.text.tokenizer=clip_bpe: {path} is missing; reinstall it: {INSTALL_HINT}")
    return path


def cache_dir() -> Path:
    """towerlab's cache: $TOWERLAB_CACHE, else $XDG_CACHE_HOME/towerlab, else ~/.cache/towerlab."""
    if os.environ.get("TOWERLAB_CACHE"):
        return Path(os.environ["TOWERLAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "towerlab"


def byte_alphabet() -> list[str]:
    """The characters of CLIP's first 256 ids, in id order: GPT-2's reversible byte -> printable character table
    (tokenizers' ByteLevel pre-tokenizer applies the same table), printable bytes first by value, then the remapped
    ones (chr(256 + n))."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = ByteLevel.alphabet()
    return sorted(c for c in chars if ord(c) < 256) + sorted(c for c in chars if ord(c) >= 256)


def build(path: Path):
    """A `tokenizers.Tokenizer` for CLIP's BPE from the merges file at `path`, ids as OpenCLIP's SimpleTokenizer."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    lines = gzip.open(path).read().decode("utf-8").split("\n")[1 : N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    byte_chars = byte_alphabet()
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + SPECIALS
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ConfigError(f"{path}: {len(vocab)} tokens, expected CLIP's {VOCAB_SIZE}: reinstall open-clip-torch")
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                        fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return tok


@functools.lru_cache(maxsize=1)
def shared():
    """`load()` once per process: Ray Data unpickles the preprocessor for every task, and reading the vocabulary
    again each time cost most of a preprocessing task's time."""
    return load()


def load():
    """CLIP's BPE as a `tokenizers.Tokenizer`, from the cache when built before (any process may build it: the
    write is atomic, and concurrent builders write identical bytes)."""
    from tokenizers import Tokenizer

    path = vocab_file()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    cached = cache_dir() / "tokenizers" / f"clip_bpe-{digest}.json"
    if cached.is_file():
        try:
            return Tokenizer.from_file(str(cached))
        except Exception:  # a cache written by an incompatible tokenizers version: rebuild it below
            pass
    tok = build(path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cached, tok.to_str())
    return tok


def clean(text: str) -> str:
    """OpenCLIP's 'lower' cleaning: ftfy's fixes, HTML entities unescaped twice, whitespace collapsed, lowercase."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class ClipBPETokenizer:
    """CLIP's BPE, encoding as OpenCLIP's `tokenize` at the recipe's context length. Loaded on first use, so the
    pipeline's preprocessor stays cheap to pickle to Ray Data's workers."""

    vocab_size = VOCAB_SIZE
    eot = EOT

    def __init__(self, context_length: int):
        if context_length < 2:
            raise ConfigError(f"model.text.context_length={context_length}: clip_bpe needs at least 2 "
                              "(<start_of_text> and <end_of_text>)")
        self.context_length = context_length
        self._tok = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tok": None}

    def ids(self, texts: Iterable[str]) -> list[list[int]]:
        """The BPE ids of each text, without start/end tokens or padding."""
        if self._tok is None:
            self._tok = shared()
        return [e.ids for e in self._tok.encode_batch([clean(t) for t in texts], add_special_tokens=False)]

    def encode_batch(self, texts: Iterable[str]) -> np.ndarray:
        L = self.context_length
        rows = self.ids(list(texts))
        out = np.zeros((len(rows), L), dtype=np.int64)
        for i, ids in enumerate(rows):
            seq = [SOT, *ids[: L - 2], EOT]  # truncation keeps <end_of_text> last, as OpenCLIP's tokenize
            out[i, : len(seq)] = seq
        return out

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def unknown_share(self, texts: Iterable[str]) -> float:
        """Byte-level BPE has no unknown token."""
        return 0.0

