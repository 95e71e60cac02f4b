"""``beit3 search index`` / ``beit3 search query``: the command line of :mod:`beit3.tasks.search`.

Kept apart from the index code so that parsing a command line loads neither torch nor a model.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

INDEX_EXAMPLES = """examples:
  beit3 search index --model runs/coco_retrieval/final --index photos.index --recursive ~/Pictures
  beit3 search index --index photos.index                      # refresh: embed new and changed images
  beit3 search index --index photos.index ~/Downloads/cats     # add a folder (its sub-folders not entered)
  beit3 search index --model beit3_base_patch16_384_coco_retrieval.pth --tokenizer beit3.spm \\
      --index coco.index --device cuda --batch-size 128 --workers 8 val2014/
"""

QUERY_EXAMPLES = """examples:
  beit3 search query --index photos.index --text "a dog running on the beach"
  beit3 search query --index photos.index --image query.jpg -k 10 --output hits.csv
  beit3 search query --index photos.index --text "red car" --text "blue car" --output hits.json
  beit3 search query --index coco.index --text "a train" --backend faiss
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from beit3.cli import summary

    search = subparsers.add_parser(
        "search", help=summary("search"),
        description="Embed folders of images once with an image-text retrieval model (index), then find the "
        "images closest to a text or an image (query).",
        epilog="examples:\n  beit3 search index --model runs/coco_retrieval/final --index photos.index ~/Pictures\n"
        "  beit3 search query --index photos.index --text \"a dog on a beach\"\n\n"
        "Run 'beit3 search index --help' and 'beit3 search query --help' for their options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = search.add_subparsers(dest="action", metavar="<action>", required=True)

    index = actions.add_parser(
        "index", help="embed new and changed images into an index folder",
        description="Embed the images in FOLDERs (image suffixes only; hidden files skipped; sub-folders with "
        "--recursive) into INDEX_DIR. The index remembers its folders (and which are recursive): a rerun embeds only new and changed files (by size and mtime), drops "
        "vanished ones (and folders that no longer exist) and retries unreadable files only once they change. Unreadable files are reported on "
        "stderr, one line each. Progress is saved every few minutes and on Ctrl-C.",
        epilog=INDEX_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    index.add_argument("folders", nargs="*", metavar="FOLDER", help="image folders or files to add (default: "
                       "the index's own, refreshed)")
    index.add_argument("--index", required=True, type=Path, metavar="INDEX_DIR", help="the index folder")
    index.add_argument("--model", type=Path, help="retrieval model folder or checkpoint file (required for a new "
                       "index; for an existing one it must be the model the index was built with)")
    index.add_argument("--tokenizer", type=Path, help="tokenizer for later text queries, recorded in the index "
                       "(default: the model folder's, or its training run's)")
    index.add_argument("--recursive", action="store_true", help="also index the sub-folders of the FOLDERs given "
                       "(remembered for later refreshes)")
    _add_run_options(index)
    index.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                       help="processes decoding images (default: %(default)s; 0 decodes in the main process)")
    index.add_argument("--checkpoint-interval", type=float, default=600.0, metavar="SECONDS",
                       help="save progress this often during long runs (default: %(default)s)")
    index.set_defaults(func=run_index)

    query = actions.add_parser(
        "query", help="find the images closest to a text or an image",
        description="Rank the indexed images by cosine similarity to each query (a text, an image, or several) "
        "and print a table; --output also writes the hits as JSON or CSV.",
        epilog=QUERY_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    query.add_argument("--index", required=True, type=Path, metavar="INDEX_DIR", help="the index folder")
    query.add_argument("--text", action="append", default=[], help="a text query (repeatable)")
    query.add_argument("--image", action="append", default=[], type=Path, help="an image query (repeatable)")
    query.add_argument("-k", type=int, default=5, help="hits per query (default: %(default)s)")
    query.add_argument("--output", type=Path, help="also write the hits to this .json or .csv file")
    query.add_argument("--backend", default="auto", metavar="{auto,exact,faiss}",
                       help="exact: one chunked matmul; faiss: IndexFlatIP (needs faiss-cpu); auto (default): "
                       "faiss when installed and the index is large")
    query.add_argument("--faiss-threshold", type=int, metavar="N",
                       help="auto uses faiss from this many images on (default: 100000)")
    query.add_argument("--model", type=Path, help="the index's model at another path (default: the recorded one)")
    query.add_argument("--tokenizer", type=Path, help="tokenizer for text queries (default: the recorded one)")
    _add_run_options(query)
    query.set_defaults(func=run_query)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call (default: %(default)s)")
    parser.add_argument("--device", default="auto",
                        help="auto (the GPU when there is one), cpu, cuda, cuda:1 ... (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch",
                        help="onnxruntime: --model is an export folder (`beit3 export`) (default: torch)")


def run_index(args: argparse.Namespace) -> int:
    from beit3.io import ensure_writable_dir
    from beit3.pipelines import resolve_device
    from beit3.tasks.search import INDEX_FILE, ImageIndex

    device = resolve_device(args.device)
    for folder in args.folders:
        if not os.path.exists(folder):
            raise FileNotFoundError(f"no such image file or folder: '{os.path.abspath(folder)}'")
    if args.model is None:  # an existing index (or an error saying there is none); no model loaded yet
        index = ImageIndex(args.index, tokenizer=args.tokenizer, device=device, runtime=args.runtime)
        ensure_writable_dir(args.index, what="index folder")
    else:
        ensure_writable_dir(args.index, what="index folder")  # before loading the model or any image
        index = ImageIndex(args.index, model=args.model, tokenizer=args.tokenizer, device=device,
                           runtime=args.runtime)
    report = index.update(args.folders, batch_size=args.batch_size, num_workers=args.workers,
                          progress=not args.no_progress, checkpoint_interval=args.checkpoint_interval,
                          recursive=args.recursive)
    print(f"index '{args.index}': {len(index)} images ({len(report.added)} added, {len(report.changed)} "
          f"changed, {len(report.removed)} removed, {report.unchanged} unchanged)")
    if report.skipped:
        print(f"{len(report.skipped)} unreadable files skipped (listed above); they are retried once they change")
    if report.dropped_roots:
        print(f"{len(report.dropped_roots)} indexed folders no longer exist and were removed from the index: "
              + ", ".join(report.dropped_roots))
    if report.skipped_before:
        print(f"{report.skipped_before} files unreadable in an earlier run and unchanged since were not retried "
              f"(listed in {args.index / INDEX_FILE})")
    return 0


def run_query(args: argparse.Namespace) -> int:
    if not args.text and not args.image:
        raise ValueError("nothing to search for: give --text \"...\" or --image PATH")
    if args.output is not None and args.output.suffix.lower() not in (".json", ".csv"):
        raise ValueError(f"--output must end in .json or .csv, got '{args.output}'")
    import torch

    from beit3.io import ensure_writable_file
    from beit3.pipelines import resolve_device
    from beit3.tasks.search import ImageIndex, write_hits

    device = resolve_device(args.device)
    if args.output is not None:
        ensure_writable_file(args.output, what="--output file")  # before loading and embedding anything
    index = ImageIndex(args.index, model=args.model, tokenizer=args.tokenizer, device=device, runtime=args.runtime)
    queries = [("text", text) for text in args.text] + [("image", str(path)) for path in args.image]
    embeddings = []
    if args.text:
        embeddings += [index.encoder.embed_texts(args.text[i:i + args.batch_size])
                       for i in range(0, len(args.text), args.batch_size)]
    if args.image:
        embeddings += [index.encoder.embed_images(args.image[i:i + args.batch_size])
                       for i in range(0, len(args.image), args.batch_size)]
    threshold = {} if args.faiss_threshold is None else {"faiss_threshold": args.faiss_threshold}
    hits = index.search(torch.cat(embeddings), args.k, backend=args.backend, **threshold)
    for (kind, query), query_hits in zip(queries, hits):
        print(f"{kind}: {query}")
        print(f"  {'rank':>4}  {'score':>7}  path")
        for hit in query_hits:
            print(f"  {hit.rank:>4}  {hit.score:>7.4f}  {hit.path}")
    if args.output is not None:
        write_hits(args.output, queries, hits)
        print(f"wrote {args.output}")
    return 0
