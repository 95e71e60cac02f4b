"""``beit3 tokenizer train | extend``: build a tokenizer for a new corpus or grow one."""
from __future__ import annotations

import argparse
from pathlib import Path

TOKENIZER_EXAMPLES = """\
examples:
  beit3 tokenizer train --input corpus/*.txt --vocab-size 32000 --output my_tokenizer
  beit3 tokenizer extend --tokenizer checkpoints/beit3_base --input greek.txt --num-new-pieces 8000 --output tok_el

The official models use beit3.spm (64000 pieces) from the BEiT-3 release; train one only for a new
corpus or language. See 'beit3 tokenizer train --help' and 'beit3 tokenizer extend --help'.
"""

TRAIN_EXAMPLES = """\
examples:
  # a 32000-piece tokenizer for your own pretraining corpus (tokenizer vocab_size = 32002)
  beit3 tokenizer train --input corpus/*.txt --vocab-size 32000 --output my_tokenizer

  # Chinese/Japanese-heavy text: cover fewer rare characters, sample 5M lines of a huge corpus
  beit3 tokenizer train --input zh.txt --vocab-size 64000 --output zh_tok \\
      --character-coverage 0.9995 --max-sentences 5000000

  # the synthetic world's ~50-word language: BPE keeps whole words as pieces
  beit3 tokenizer train --input data/synthetic/corpus.txt --vocab-size 200 --model-type bpe \
      --output data/synthetic/tokenizer
"""

EXTEND_EXAMPLES = """\
examples:
  # add 8000 Greek pieces to a tokenizer; every old id (and <mask>) keeps its meaning
  beit3 tokenizer extend --tokenizer checkpoints/beit3_base --input greek.txt \\
      --num-new-pieces 8000 --output tok_el

  # the same, and grow the model's text embedding and MLM head to the new vocabulary
  beit3 tokenizer extend --tokenizer checkpoints/beit3_base --input greek.txt \\
      --num-new-pieces 8000 --output tok_el --model checkpoints/beit3_base --model-output beit3_base_el
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from beit3.cli import summary

    parser = subparsers.add_parser(
        "tokenizer", help=summary("tokenizer"),
        description="Train a BEiT-3 tokenizer (XLM-R id layout) or extend one with new pieces.",
        epilog=TOKENIZER_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True)

    train = actions.add_parser(
        "train", help="train a unigram tokenizer on text files",
        description="Train a unigram SentencePiece tokenizer with the BEiT-3 special ids "
                    "(<s>=0 <pad>=1 </s>=2 <unk>=3, <mask> last). Lines over 4192 bytes are split, "
                    "not dropped.",
        epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--input", nargs="+", required=True, metavar="FILE",
                       help="UTF-8 text files, one sentence or paragraph a line")
    train.add_argument("--vocab-size", type=int, required=True,
                       help="SentencePiece pieces (the official model has 64000); ids = this + 2")
    train.add_argument("--output", required=True, metavar="DIR", help="directory to write the tokenizer to")
    _add_corpus_options(train)
    train.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram",
                       help="SentencePiece model: unigram as the release (default), or bpe for a corpus with "
                            "few distinct words (the synthetic world), where unigram keeps character fragments")
    train.add_argument("--verbose", action="store_true", help="show SentencePiece's training log")
    train.set_defaults(func=_run_train)

    extend = actions.add_parser(
        "extend", help="add new pieces (e.g. a new language) keeping all old ids",
        description="Learn pieces from new text, append those missing from a tokenizer and "
                    "optionally resize a model's text embedding and MLM head to match, keeping "
                    "the old rows.",
        epilog=EXTEND_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    extend.add_argument("--tokenizer", required=True, metavar="PATH",
                        help="tokenizer directory or SentencePiece file to extend")
    extend.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text of the new domain")
    extend.add_argument("--num-new-pieces", type=int, required=True, help="how many pieces to add")
    extend.add_argument("--output", required=True, metavar="DIR", help="directory for the extended tokenizer")
    extend.add_argument("--model", metavar="MODEL_DIR", help="saved model to resize (needs --model-output)")
    extend.add_argument("--model-output", metavar="DIR", help="where to save the resized model")
    _add_corpus_options(extend)
    extend.set_defaults(func=_run_extend)


def _add_corpus_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--character-coverage", type=float, default=0.9995,
                        help="share of characters that get their own piece (default: %(default)s)")
    parser.add_argument("--max-sentences", type=int, default=0,
                        help="sample at most this many lines (default: 0 = all)")
    parser.add_argument("--num-threads", type=int, default=None, help="training threads (default: all cores)")


def _run_train(args: argparse.Namespace) -> int:
    from beit3.io import ensure_writable_dir
    from beit3.processing.tokenizer_training import train_tokenizer

    ensure_writable_dir(args.output, what="--output folder")  # before reading the corpus
    tokenizer = train_tokenizer(args.input, args.vocab_size, args.output,
                                character_coverage=args.character_coverage,
                                max_sentences=args.max_sentences, num_threads=args.num_threads,
                                verbose=args.verbose, model_type=args.model_type)
    print(f"saved {tokenizer!r} to {args.output}")
    return 0


def _run_extend(args: argparse.Namespace) -> int:
    from beit3.io import ensure_writable_dir
    from beit3.processing.tokenizer_training import extend_tokenizer, resize_model_for_tokenizer

    if bool(args.model) != bool(args.model_output):
        raise ValueError("--model and --model-output go together: pass both to resize a model, or neither")
    if args.model and not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model} is not a model folder: pass one written by save_pretrained "
                                "or `beit3 convert` (config.json + model.safetensors)")
    ensure_writable_dir(args.output, what="--output folder")  # before any training
    if args.model_output:
        ensure_writable_dir(args.model_output, what="--model-output folder")
    tokenizer = extend_tokenizer(args.tokenizer, args.input, args.num_new_pieces, args.output,
                                 character_coverage=args.character_coverage,
                                 max_sentences=args.max_sentences, num_threads=args.num_threads)
    print(f"saved {tokenizer!r} to {args.output}")
    if args.model:
        rows = resize_model_for_tokenizer(args.model, tokenizer, args.model_output)
        print(f"saved the model with {rows} text embedding rows to {args.model_output}")
    return 0
