"""SentencePiece tokenizer with the XLM-R id layout that BEiT-3 checkpoints were trained with.

The official code builds Hugging Face's ``XLMRobertaTokenizer`` from ``beit3.spm``. That class puts
four fairseq special tokens in front of the SentencePiece vocabulary and shifts every piece by one:

====================  =====================================================
id                    token
====================  =====================================================
0                     ``<s>``  (BOS, also used as CLS)
1                     ``<pad>``
2                     ``</s>`` (EOS, also used as SEP)
3                     ``<unk>``
piece ``i`` (i >= 3)  ``i + 1``
``len(spm) + 1``      ``<mask>`` (64001 for the official 64000-piece file)
====================  =====================================================

SentencePiece ids 0-2 (``<unk>``, ``<s>``, ``</s>`` inside the ``.spm`` file) are shadowed by the
fairseq tokens, so the layout only works for models whose unknown piece is id 0 and whose ids 1 and
2 are control symbols; other files are rejected instead of silently colliding with ``<pad>``.

A tokenizer extended with new pieces (:func:`beit3.processing.extend_tokenizer`) keeps ``<mask>``
at its old id so every old embedding row stays valid; pieces appended to the SentencePiece model
then sit after ``<mask>`` (``i + 2``). ``tokenizer_config.json`` records where ``<mask>`` is.

This module needs only ``sentencepiece`` (and ``torch`` for tensor outputs), not ``transformers``.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, Union

import sentencepiece as spm
import torch

from beit3.processing.batch import BatchEncoding

BOS_TOKEN, PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, MASK_TOKEN = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPM_FILENAME = "sentencepiece.model"
CONFIG_FILENAME = "tokenizer_config.json"
_CONFIG_KEYS = {"tokenizer_class", "sentencepiece_model", "mask_token_id"}

# Hugging Face treats special tokens written in the text as those tokens; `<mask>` also swallows
# the whitespace before it (its AddedToken has lstrip=True), so "a <mask>" gives ["▁a", "<mask>"].
_SPECIAL_IN_TEXT = re.compile(r"(\s*<mask>|<s>|</s>|<pad>|<unk>)")

TextInput = Union[str, Sequence[int]]
Padding = Literal["max_length", "longest", False]
_PADDING = {True: "longest", "do_not_pad": False}  # Hugging Face's other spellings
_TRUNCATION = {"longest_first": True, "only_first": True, "do_not_truncate": False}


_BATCH_ENCODE_FROM = 32  # texts; up to this many, encoding one by one is faster (measured)

class Beit3Tokenizer:
    """Tokenizer giving exactly the ids of ``XLMRobertaTokenizer(beit3.spm)``.

    Args:
        spm_path: a SentencePiece model file (``beit3.spm``, ``*.model``).
        mask_token_id: id of ``<mask>``; leave unset for an original (non-extended) model, where it
            is ``len(spm) + 1``.
    """

    def __init__(self, spm_path: str | os.PathLike, *, mask_token_id: int | None = None) -> None:
        path = Path(spm_path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: '{path}'")
        self._init_from_proto(path.read_bytes(), source=str(path), mask_token_id=mask_token_id)

    @classmethod
    def from_serialized(
        cls, model_proto: bytes, *, mask_token_id: int | None = None, source: str = "<bytes>"
    ) -> "Beit3Tokenizer":
        """Build a tokenizer from the bytes of a SentencePiece model (no file needed)."""
        tokenizer = cls.__new__(cls)
        tokenizer._init_from_proto(model_proto, source=source, mask_token_id=mask_token_id)
        return tokenizer

    def _init_from_proto(self, model_proto: bytes, *, source: str, mask_token_id: int | None) -> None:
        if not model_proto:
            raise ValueError(f"'{source}' is empty, not a SentencePiece model")
        try:
            sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as err:
            raise ValueError(f"'{source}' is not a SentencePiece model ({err})") from None
        num_pieces = sp.get_piece_size()
        if num_pieces < 4 or sp.unk_id() != 0 or not (sp.is_control(1) and sp.is_control(2)):
            raise ValueError(
                f"'{source}' does not use the XLM-R layout (<unk>=0, <s>=1, </s>=2 as control "
                "pieces), so its ids would collide with <pad>/</s>/<unk>. Train it with "
                "'beit3 tokenizer train' or SentencePiece's defaults (unk_id=0 bos_id=1 eos_id=2)."
            )
        if mask_token_id is None:
            mask_token_id = num_pieces + 1
        if not 4 <= mask_token_id <= num_pieces + 1:
            raise ValueError(
                f"mask_token_id={mask_token_id} is outside [4, {num_pieces + 1}] for '{source}'"
            )
        self._sp = sp
        self._proto = model_proto
        self._mask_id = mask_token_id
        # SentencePiece ids up to this bound shift by one; later ones (appended when extending)
        # shift by two to step over <mask>.
        self._last_shift_one = mask_token_id - 2
        self._special_ids = {BOS_TOKEN: BOS_ID, PAD_TOKEN: PAD_ID, EOS_TOKEN: EOS_ID, UNK_TOKEN: UNK_ID,
                             MASK_TOKEN: mask_token_id}
        self._special_tokens = {i: t for t, i in self._special_ids.items()}

    # ------------------------------------------------------------------ ids and properties
    @property
    def bos_token_id(self) -> int:
        return BOS_ID

    @property
    def pad_token_id(self) -> int:
        return PAD_ID

    @property
    def eos_token_id(self) -> int:
        return EOS_ID

    @property
    def unk_token_id(self) -> int:
        return UNK_ID

    @property
    def mask_token_id(self) -> int:
        return self._mask_id

    @property
    def vocab_size(self) -> int:
        """Number of ids (64002 for the official file): SentencePiece pieces + ``<pad>`` + ``<mask>``."""
        return self._sp.get_piece_size() + 2

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(self._special_tokens)

    @property
    def model_proto(self) -> bytes:
        """The serialized SentencePiece model, as saved by :meth:`save_pretrained`."""
        return self._proto

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Beit3Tokenizer(vocab_size={self.vocab_size}, mask_token_id={self._mask_id})"

    def _spm_to_id(self, spm_id: int) -> int:
        if spm_id == 0:  # SentencePiece's unknown piece
            return UNK_ID
        return spm_id + 1 if spm_id <= self._last_shift_one else spm_id + 2

    def _id_to_spm(self, token_id: int) -> int | None:
        """SentencePiece id of a regular token id, or None for special and out-of-vocabulary ids."""
        if token_id in self._special_tokens or token_id >= self.vocab_size:
            return None
        return token_id - 1 if token_id < self._mask_id else token_id - 2

    # ------------------------------------------------------------------ pieces
    def tokenize(self, text: str) -> list[str]:
        """SentencePiece pieces of ``text``, with special tokens written in it kept whole."""
        pieces: list[str] = []
        for segment, is_special in self._split_special(text):
            if is_special:
                pieces.append(segment)
            else:
                pieces.extend(self._sp.encode(segment, out_type=str))
        return pieces

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        """Ids of pieces, as ``XLMRobertaTokenizer.convert_tokens_to_ids`` (unknown pieces -> 3)."""
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def _token_to_id(self, token: str) -> int:
        if token in self._special_ids:
            return self._special_ids[token]
        return self._spm_to_id(self._sp.piece_to_id(token))

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        """Pieces of ids; ids past the vocabulary (unused model rows) read as ``<unk>``."""
        if isinstance(ids, int):
            return self._id_to_token(ids)
        return [self._id_to_token(int(i)) for i in ids]

    def _id_to_token(self, token_id: int) -> str:
        if token_id < 0:
            raise ValueError(f"token id {token_id} is negative")
        if token_id in self._special_tokens:
            return self._special_tokens[token_id]
        spm_id = self._id_to_spm(token_id)
        return UNK_TOKEN if spm_id is None else self._sp.id_to_piece(spm_id)

    def _split_special(self, text: str) -> list[tuple[str, bool]]:
        if "<" not in text:
            return [(text, False)] if text else []
        parts: list[tuple[str, bool]] = []
        for i, part in enumerate(_SPECIAL_IN_TEXT.split(text)):
            if i % 2:  # captured separator: a special token (with the whitespace <mask> swallows)
                parts.append((part.strip(), True))
            elif part:
                parts.append((part, False))
        return parts

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of ``text``; with special tokens, wrapped as ``<s> ... </s>`` like the official loader."""
        ids = self._encode_batch([text])[0]
        return [BOS_ID, *ids, EOS_ID] if add_special_tokens else ids

    def _encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        plain = [i for i, t in enumerate(texts) if "<" not in t]
        out: list[list[int]] = [[] for _ in texts]
        # Texts without special tokens go through SentencePiece's batched C++ encoder at once;
        # a few go one by one, as the batched call costs ~0.1 ms of thread start-up (a data loader
        # that tokenises each sample would spend more time there than in the model).
        batch = [texts[i] for i in plain]
        encoded = self._sp.encode(batch) if len(batch) > _BATCH_ENCODE_FROM else [self._sp.encode(t) for t in batch]
        for i, spm_ids in zip(plain, encoded):
            out[i] = [self._spm_to_id(s) for s in spm_ids]
        for i, text in enumerate(texts):
            if "<" in text:
                out[i] = self.convert_tokens_to_ids(self.tokenize(text))
        return out

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. Special tokens (and ids of unused model rows, read as ``<unk>``) are
        dropped when ``skip_special_tokens``; otherwise they are written with spaces around them,
        as Hugging Face does."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        chunks: list[str] = []
        run: list[int] = []
        for token_id in ids:
            token_id = int(token_id)
            if token_id < 0:
                raise ValueError(f"token id {token_id} is negative")
            spm_id = self._id_to_spm(token_id)
            if spm_id is not None:
                run.append(spm_id)
                continue
            if skip_special_tokens:
                continue
            if run:
                chunks.append(self._sp.decode(run))
                run = []
            chunks.append(self._special_tokens.get(token_id, UNK_TOKEN))
        if run:
            chunks.append(self._sp.decode(run))
        return " ".join(c for c in chunks if c)

    def batch_decode(
        self, sequences: Iterable[Iterable[int]] | torch.Tensor, skip_special_tokens: bool = True
    ) -> list[str]:
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in sequences]

    def __call__(
        self,
        text: TextInput | Sequence[TextInput],
        padding: bool | str = False,
        truncation: bool | str = False,
        max_length: int | None = None,
        return_tensors: Literal["pt"] | None = None,
        add_special_tokens: bool = True,
    ) -> BatchEncoding:
        """Encode text into ``input_ids`` and ``attention_mask`` (1 = real token, 0 = padding), with
        Hugging Face's arguments and shapes.

        * ``text``: a string, or a list of strings; an item may also be a list of ids without special
          tokens (as stored in the official index files).
        * ``padding``: ``True``/``"longest"`` (to the longest text), ``"max_length"``, or
          ``False``/``"do_not_pad"``. Padding goes on the right.
        * ``truncation``: ``True``/``"longest_first"`` cuts the content to ``max_length - 2`` so BOS and
          EOS always survive, as the official ``_get_text_segment`` does.
        * ``return_tensors``: ``"pt"`` for ``(B, L)`` tensors, ``None`` for lists. One string with
          ``return_tensors=None`` gives flat lists (``[0, 1284, 2]``), a list of strings lists of lists.

        Sequences are ``<s> ... </s>`` unless ``add_special_tokens=False``. The defaults are Hugging
        Face's (no padding, no truncation, lists); a model batch is
        ``tokenizer(texts, max_length=64, padding="max_length", truncation=True, return_tensors="pt")``.
        """
        single = isinstance(text, str) or (
            isinstance(text, Sequence) and len(text) > 0 and isinstance(text[0], int))
        texts = [text] if single else text
        if isinstance(texts, torch.Tensor) or not isinstance(texts, Sequence) or isinstance(texts, (bytes, bytearray)):
            raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
        strings = [t for t in texts if isinstance(t, str)]
        encoded = iter(self._encode_batch(strings))
        contents = [next(encoded) if isinstance(t, str) else self._check_ids(t) for t in texts]
        batch = self.pad(contents, max_length=max_length, padding=padding, truncation=truncation,
                         return_tensors=return_tensors, add_special_tokens=add_special_tokens)
        if single and return_tensors is None:
            return BatchEncoding({key: rows[0] for key, rows in batch.items()})
        return batch

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if not isinstance(ids, Sequence) or not all(isinstance(i, int) for i in ids):
            raise TypeError("each text must be a string or a list of int token ids")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside [0, {self.vocab_size})")
        return list(ids)

    def pad(
        self,
        contents: Sequence[Sequence[int]],
        max_length: int | None = None,
        padding: bool | str = False,
        truncation: bool | str = False,
        return_tensors: Literal["pt"] | None = None,
        add_special_tokens: bool = True,
    ) -> BatchEncoding:
        """Add BOS/EOS to id lists (without special tokens), truncate, pad right and build masks."""
        padding = _PADDING.get(padding, padding)  # type: ignore[call-overload]
        if padding not in ("max_length", "longest", False):
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        truncation = _TRUNCATION.get(truncation, truncation)  # type: ignore[call-overload]
        if truncation not in (True, False):
            raise ValueError(f"truncation must be True, False or 'longest_first', got {truncation!r}")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        specials = 2 if add_special_tokens else 0
        if max_length is None and (padding == "max_length" or truncation):
            raise ValueError("padding='max_length' and truncation need max_length (the model's text length, "
                             "e.g. 64)")
        if max_length is not None and max_length < specials:
            raise ValueError(f"max_length must be at least 2 (BOS and EOS), got {max_length}")
        sequences = []
        for ids in contents:
            if truncation:
                ids = ids[: max_length - specials]
            elif padding == "max_length" and len(ids) + specials > max_length:
                raise ValueError(
                    f"a text has {len(ids) + specials} tokens, more than max_length={max_length}; "
                    "enable truncation or raise max_length"
                )
            sequences.append([BOS_ID, *ids, EOS_ID] if add_special_tokens else list(ids))
        if padding == "max_length":
            width = max_length
        elif padding == "longest":
            width = max((len(s) for s in sequences), default=0)
        else:
            width = None
        if width is not None:
            input_ids = [s + [PAD_ID] * (width - len(s)) for s in sequences]
        else:
            input_ids = sequences
        attention_mask = [[1] * len(s) + [0] * (len(row) - len(s)) for s, row in zip(sequences, input_ids)]
        if return_tensors is None:
            return BatchEncoding(input_ids=input_ids, attention_mask=attention_mask)
        if len({len(row) for row in input_ids}) > 1:
            raise ValueError("texts have different lengths; use padding=True (the longest) or 'max_length' "
                             "for tensors")
        width = len(input_ids[0]) if input_ids else 0
        return BatchEncoding(
            input_ids=torch.tensor(input_ids, dtype=torch.long).view(len(input_ids), width),
            attention_mask=torch.tensor(attention_mask, dtype=torch.long).view(len(input_ids), width),
        )

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: str | os.PathLike) -> list[Path]:
        """Write ``sentencepiece.model`` and ``tokenizer_config.json`` into ``save_directory``."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        spm_file = directory / SPM_FILENAME
        spm_file.write_bytes(self._proto)
        config_file = directory / CONFIG_FILENAME
        config = {"tokenizer_class": type(self).__name__, "sentencepiece_model": SPM_FILENAME,
                  "mask_token_id": self._mask_id}
        config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return [spm_file, config_file]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Beit3Tokenizer":
        """Load from a SentencePiece file or a directory written by :meth:`save_pretrained`.

        A directory without ``tokenizer_config.json`` must hold exactly one ``.spm``/``.model``
        file, so a folder with only the official ``beit3.spm`` works too.
        """
        path = Path(path)
        if path.is_file():
            return cls(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no tokenizer at '{path}': pass the SentencePiece file (the official "
                                    "beit3.spm) or a folder written by `beit3 tokenizer train` or save_pretrained")
        config_file = path / CONFIG_FILENAME
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ValueError(f"'{config_file}' is not valid JSON: {err}") from None
            unknown = set(config) - _CONFIG_KEYS
            if unknown:
                raise ValueError(f"'{config_file}' has unknown keys {sorted(unknown)}")
            return cls(path / config.get("sentencepiece_model", SPM_FILENAME),
                       mask_token_id=config.get("mask_token_id"))
        candidates = sorted(p for p in path.iterdir() if p.suffix in (".spm", ".model") and p.is_file())
        if len(candidates) != 1:
            found = ", ".join(p.name for p in candidates) or "none"
            raise FileNotFoundError(
                f"no tokenizer in '{path}': expected {CONFIG_FILENAME} or exactly one .spm/.model "
                f"file (found: {found})"
            )
        return cls(candidates[0])
