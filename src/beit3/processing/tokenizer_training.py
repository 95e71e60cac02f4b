"""Training a BEiT-3 tokenizer on a new corpus and extending one with new pieces.

Both produce SentencePiece unigram models with the XLM-R layout of :mod:`.tokenizer`
(``<unk>``=0, ``<s>``=1, ``</s>``=2 inside the ``.spm`` file), so the trained tokenizer gives the
same special ids as the official ``beit3.spm``.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import struct
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

from beit3.processing.image import CONFIG_FILENAME as IMAGE_CONFIG
from beit3.processing.processor import CONFIG_FILENAME as PROCESSOR_CONFIG
from beit3.processing.tokenizer import Beit3Tokenizer

# SentencePiece drops (with only a log line) every sentence longer than this many bytes.
MAX_SENTENCE_BYTES = 4192
MODEL_TYPES = ("unigram", "bpe")


def split_long_line(line: str, max_bytes: int = MAX_SENTENCE_BYTES) -> list[str]:
    """Cut ``line`` into chunks of at most ``max_bytes`` UTF-8 bytes so SentencePiece keeps them.

    Cuts fall on the last whitespace before the limit when there is one (so words stay whole) and
    otherwise between characters (scripts written without spaces), never inside a character.
    """
    if len(line.encode("utf-8")) <= max_bytes:
        return [line]
    chunks: list[str] = []
    rest = line
    while len(rest.encode("utf-8")) > max_bytes:
        # Longest prefix whose encoding fits: characters are 1-4 bytes, so search by bytes.
        head = rest.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
        space = max(head.rfind(" "), head.rfind("\t"))
        cut = space if space > 0 else len(head)
        chunks.append(rest[:cut])
        rest = rest[cut:].lstrip()
    if rest:
        chunks.append(rest)
    return [c for c in chunks if c.strip()]


def _check_inputs(input_files: Sequence[str | os.PathLike]) -> list[Path]:
    if not input_files:
        raise ValueError("no input files given")
    paths = [Path(p) for p in input_files]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"input file not found: '{path}'")
    return paths


class _Corpus:
    """Iterates over the non-empty lines of text files, splitting over-long ones, with progress."""

    def __init__(self, paths: list[Path], progress: bool, max_line_bytes: int) -> None:
        self.paths = paths
        self.progress = progress
        self.max_line_bytes = max_line_bytes
        self.num_sentences = 0
        self.num_split_lines = 0

    def __iter__(self) -> Iterator[str]:
        total = sum(p.stat().st_size for p in self.paths)
        with tqdm(total=total, unit="B", unit_scale=True, desc="reading corpus",
                  disable=not self.progress, file=sys.stderr) as bar:
            for path in self.paths:
                with path.open("rb") as handle:
                    for line_no, raw in enumerate(handle, start=1):
                        bar.update(len(raw))
                        try:
                            line = raw.decode("utf-8").strip()
                        except UnicodeDecodeError as err:
                            raise ValueError(f"'{path}' line {line_no} is not UTF-8 text: {err}") from None
                        if not line:
                            continue
                        chunks = split_long_line(line, self.max_line_bytes)
                        self.num_split_lines += len(chunks) > 1
                        for chunk in chunks:
                            self.num_sentences += 1
                            yield chunk


def _train_sentencepiece(corpus: _Corpus, vocab_size: int, *, character_coverage: float,
                         max_sentences: int, num_threads: int, hard_vocab_limit: bool,
                         verbose: bool, model_type: str = "unigram") -> bytes:
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus),
            model_writer=writer,
            model_type=model_type,
            vocab_size=vocab_size,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # XLM-R layout; <pad> is added by the tokenizer
            character_coverage=character_coverage,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=corpus.max_line_bytes,
            num_threads=num_threads,
            hard_vocab_limit=hard_vocab_limit,
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as err:
        raise _explain_training_error(err, vocab_size, corpus) from None
    return writer.getvalue()


def _explain_training_error(err: RuntimeError, vocab_size: int, corpus: _Corpus) -> Exception:
    message = str(err)
    if corpus.num_sentences == 0:
        return ValueError(f"no text in {', '.join(map(str, corpus.paths))}: every line is empty")
    too_high = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", message)
    if too_high:
        limit = int(too_high.group(2))
        return ValueError(
            f"the corpus ({corpus.num_sentences} sentences) is too small for vocab_size={vocab_size}: "
            f"it supports at most {limit} pieces. Add more text or use a vocabulary size <= {limit}."
        )
    too_few_chars = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_few_chars:
        needed = int(too_few_chars.group(2))
        return ValueError(
            f"vocab_size={vocab_size} cannot hold the {needed} characters the corpus needs (plus "
            f"3 special pieces); use a vocabulary size > {needed + 3} or a lower character_coverage."
        )
    return RuntimeError(f"SentencePiece training failed: {message}")


def train_tokenizer(
    input_files: Sequence[str | os.PathLike],
    vocab_size: int,
    output_dir: str | os.PathLike | None = None,
    *,
    character_coverage: float = 0.9995,
    max_sentences: int = 0,
    num_threads: int | None = None,
    progress: bool = True,
    verbose: bool = False,
    max_line_bytes: int = MAX_SENTENCE_BYTES,
    model_type: str = "unigram",
) -> Beit3Tokenizer:
    """Train a SentencePiece tokenizer with the BEiT-3 special-id layout (unigram, as the release).

    Args:
        input_files: UTF-8 text files, one sentence or paragraph a line.
        vocab_size: number of SentencePiece pieces (64000 in the official model); the tokenizer's
            ``vocab_size`` is two more (``<pad>`` and ``<mask>``).
        output_dir: where to save the tokenizer (``save_pretrained`` layout); None keeps it in memory.
        character_coverage: share of characters the vocabulary must cover; the rest become
            ``<unk>``. SentencePiece recommends 0.9995 for large character sets (CJK) and 1.0 else.
        max_sentences: sample at most this many sentences (0 = use all) so huge corpora fit in memory.
        num_threads: training threads (default: all CPU cores).
        progress: show a progress bar while reading the corpus.
        verbose: print SentencePiece's own log (EM iterations) during training.
        max_line_bytes: lines longer than this are split (not dropped, as SentencePiece would).
        model_type: ``"unigram"`` (the release's) or ``"bpe"``. On a corpus with very few distinct
            words (the synthetic world has ~50) unigram training caps the vocabulary below the
            word count and keeps character fragments ("yellow" -> y/e/ll/ow), which turns masked
            language modeling into spelling; BPE merges those words into whole pieces.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    if vocab_size < 8:
        raise ValueError(f"vocab_size must be at least 8, got {vocab_size}")
    corpus = _Corpus(_check_inputs(input_files), progress, max_line_bytes)
    proto = _train_sentencepiece(corpus, vocab_size, character_coverage=character_coverage,
                                 max_sentences=max_sentences, num_threads=num_threads or os.cpu_count() or 1,
                                 hard_vocab_limit=True, verbose=verbose, model_type=model_type)
    if progress:
        print(f"trained a {vocab_size}-piece {model_type} model on {corpus.num_sentences} sentences "
              f"({corpus.num_split_lines} long lines split)", file=sys.stderr)
    tokenizer = Beit3Tokenizer.from_serialized(proto, source="trained model")
    if output_dir is not None:
        tokenizer.save_pretrained(output_dir)
    return tokenizer


# ---------------------------------------------------------------------- extending
# A SentencePiece model file is a protobuf ``ModelProto``; field 1 is the repeated piece list.
# Appending encoded pieces to the bytes appends them to that list, which is all extending needs,
# so no protobuf package is required.
_WIRE_VARINT, _WIRE_FIXED64, _WIRE_BYTES, _WIRE_FIXED32 = 0, 1, 2, 5
_UNIGRAM = 1


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) for each field of a serialized protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _WIRE_VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire == _WIRE_BYTES:
            size, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == _WIRE_FIXED32:
            value, pos = buf[pos:pos + 4], pos + 4
        elif wire == _WIRE_FIXED64:
            value, pos = buf[pos:pos + 8], pos + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _model_type(proto: bytes) -> int:
    """``TrainerSpec.model_type`` (field 2 -> field 3) of a model; unigram when unset."""
    for number, wire, value in _fields(proto):
        if number == 2 and wire == _WIRE_BYTES:
            for inner_number, inner_wire, inner_value in _fields(value):  # type: ignore[arg-type]
                if inner_number == 3 and inner_wire == _WIRE_VARINT:
                    return int(inner_value)  # type: ignore[arg-type]
    return _UNIGRAM


def _encode_piece(piece: str, score: float) -> bytes:
    """A ``ModelProto.pieces`` entry: piece (field 1) and score (field 2); type NORMAL is the default."""
    text = piece.encode("utf-8")
    body = b"\x0a" + _varint(len(text)) + text + b"\x15" + struct.pack("<f", score)
    return b"\x0a" + _varint(len(body)) + body


def extend_tokenizer(
    tokenizer: Beit3Tokenizer | str | os.PathLike,
    input_files: Sequence[str | os.PathLike],
    num_new_pieces: int,
    output_dir: str | os.PathLike | None = None,
    *,
    character_coverage: float = 0.9995,
    max_sentences: int = 0,
    num_threads: int | None = None,
    progress: bool = True,
) -> Beit3Tokenizer:
    """Add ``num_new_pieces`` pieces learnt from ``input_files`` (e.g. a new language).

    Every old id keeps its meaning, ``<mask>`` included, so a model's old embedding rows stay
    valid; the new pieces get ids ``old vocab_size ... old vocab_size + num_new_pieces - 1``. A
    unigram model is trained on the new corpus; its pieces missing from the old vocabulary are
    added, single characters first (otherwise they would stay ``<unk>``), then by score. They keep
    the new model's log-probability scores, so segmentation of text in the old languages changes
    only where a new piece matches it.
    """
    base = tokenizer if isinstance(tokenizer, Beit3Tokenizer) else Beit3Tokenizer.from_pretrained(tokenizer)
    if num_new_pieces < 1:
        raise ValueError(f"num_new_pieces must be at least 1, got {num_new_pieces}")
    if _model_type(base.model_proto) != _UNIGRAM:
        raise ValueError("only unigram SentencePiece models can be extended (pieces are scored by "
                         "log-probability); this tokenizer uses another model type")
    corpus = _Corpus(_check_inputs(input_files), progress, MAX_SENTENCE_BYTES)
    # Ask for headroom: part of what the new corpus learns is already in the old vocabulary.
    proto = _train_sentencepiece(corpus, 3 * num_new_pieces + 3, character_coverage=character_coverage,
                                 max_sentences=max_sentences, num_threads=num_threads or os.cpu_count() or 1,
                                 hard_vocab_limit=False, verbose=False)
    learnt = spm.SentencePieceProcessor(model_proto=proto)
    old = spm.SentencePieceProcessor(model_proto=base.model_proto)
    candidates = []
    for i in range(learnt.get_piece_size()):
        if learnt.is_control(i) or learnt.is_unknown(i) or learnt.is_unused(i):
            continue
        piece = learnt.id_to_piece(i)
        if old.piece_to_id(piece) == old.unk_id() and piece != old.id_to_piece(old.unk_id()):
            candidates.append((len(piece) > 1, -learnt.get_score(i), piece, learnt.get_score(i)))
    if len(candidates) < num_new_pieces:
        raise ValueError(
            f"the new corpus yields only {len(candidates)} pieces that are not in the vocabulary; "
            f"lower num_new_pieces (asked {num_new_pieces}) or add more text"
        )
    chosen = sorted(candidates)[:num_new_pieces]
    extended = base.model_proto + b"".join(_encode_piece(piece, score) for *_, piece, score in chosen)
    result = Beit3Tokenizer.from_serialized(extended, mask_token_id=base.mask_token_id,
                                            source="extended model")
    if progress:
        print(f"added {num_new_pieces} pieces: vocab_size {base.vocab_size} -> {result.vocab_size}",
              file=sys.stderr)
    if output_dir is not None:
        result.save_pretrained(output_dir)
    return result


def resize_model_for_tokenizer(
    model_path: str | os.PathLike, tokenizer: Beit3Tokenizer, output_dir: str | os.PathLike
) -> int:
    """Grow a saved model's text embedding and MLM head to ``tokenizer.vocab_size`` rows.

    Old rows are kept (``resize_token_embeddings`` copies them), which is only meaningful because
    :func:`extend_tokenizer` keeps every old id. Models already larger (the official ones have 8
    unused rows) are left as they are. The tokenizer is saved next to the model so the output
    directory is complete; image and processor configs found with the model are copied along.
    Returns the model's vocabulary size afterwards.
    """
    from beit3.models import load_any_model  # the model package is optional for tokenizer work

    model = load_any_model(model_path)
    rows = model.config.vocab_size
    if tokenizer.vocab_size > rows:
        model.resize_token_embeddings(tokenizer.vocab_size)
        rows = tokenizer.vocab_size
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    for name in (IMAGE_CONFIG, PROCESSOR_CONFIG):  # keep the image pipeline with the model
        source = Path(model_path) / name
        if source.is_file():
            shutil.copyfile(source, Path(output_dir) / name)
    return rows
