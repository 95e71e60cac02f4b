"""`beit3 predict <kind>`: run a fine-tuned model on your own images and text.

Kinds: ``caption``, ``vqa``, ``classify``, ``nlvr2``, ``zero-shot`` (thin wrappers around
:mod:`beit3.pipelines`, which does the work) and ``detection``, ``segmentation``
(:mod:`beit3.tasks.predict_dense`). Files are listed, loaded and reported by
:mod:`beit3.tasks.predict_io`, so every kind treats bad files the same way.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any


EXAMPLES = """examples:
  beit3 predict caption --model runs/cap/final photos/ --output captions.csv
  beit3 predict vqa --model runs/vqa/final --question "what colour is the car?" street.jpg
  beit3 predict classify --model runs/imagenet/final --labels classes.txt photos/ --top-k 3
  beit3 predict nlvr2 --model runs/nlvr2/final --statement "both images show two dogs" left.jpg right.jpg
  beit3 predict zero-shot --model runs/retrieval/final --classes val/ --evaluate --output zs.json
  beit3 predict detection --model runs/det/final --out drawn/ photos/

Run 'beit3 predict <kind> --help' for the options of each kind.
"""

COMMON_EPILOG = """
Bad files (missing, empty, not an image, corrupt, too many pixels) are reported on stderr, one
line each, and skipped; the exit status is 0 when anything was predicted. The tokenizer, image
settings and label names come from the model folder, else from the run.yaml training wrote
beside it (see docs/inference.md)."""


def _examples(*lines: str) -> str:
    return "examples:\n" + "".join(f"  {line}\n" for line in lines) + COMMON_EPILOG


def _add_kind(kinds: argparse._SubParsersAction, spec: Any, help_text: str, description: str,
              epilog: str, *, text: bool = True, top_k: bool = False, folders: bool = True) -> argparse.ArgumentParser:
    parser = kinds.add_parser(spec.verb, help=help_text, description=description, epilog=epilog,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path,
                        help="model folder (from `beit3 finetune`, a checkpoint, or save_pretrained)")
    parser.add_argument("--output", type=Path, help="write the predictions to this .json or .csv file")
    parser.add_argument("--batch-size", type=int, default=8, help="inputs per forward pass (default 8)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: the GPU if there is one)")
    parser.add_argument("--backend", "--runtime", dest="backend", choices=("torch", "onnxruntime"), default="torch",
                        help="onnxruntime: --model is an export folder (`beit3 export`) (default: torch)")
    if folders:
        parser.add_argument("--recursive", action="store_true",
                            help="also take the images in sub-folders of the folders named (default: only their own files)")
    if text:
        parser.add_argument("--tokenizer", type=Path,
                            help="SentencePiece file or tokenizer folder (default: the model folder's, or its run's)")
    if top_k:
        parser.add_argument("--top-k", type=int, default=5, help="how many answers or labels to list (default 5)")
    return parser


def register(subparsers: argparse._SubParsersAction) -> None:
    from beit3.cli import summary

    from beit3.catalogue import iter_tasks

    parser = subparsers.add_parser(
        "predict", help=summary("predict"),
        description="Run a fine-tuned model folder on image files and folders, and print, or write as JSON or "
        "CSV, what it predicts.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = parser.add_subparsers(dest="kind", metavar="<kind>", required=True)
    for spec in iter_tasks("finetune", having="predict"):
        spec.predict_command()(kinds, spec)



def add_caption(kinds: argparse._SubParsersAction, spec: Any) -> None:
    """`beit3 predict {spec.verb}`."""
    caption = _add_kind(
        kinds, spec, "describe images in a sentence (Beit3ForCaptioning)",
        "Caption images with a captioning model: beam search with the key/value cache.",
        _examples("beit3 predict caption --model runs/cap/final photo.jpg",
                  "beit3 predict caption --model runs/cap/final photos/ --num-beams 5 --output captions.json"))
    caption.add_argument("images", nargs="+", type=Path, help="image files and/or folders")
    caption.add_argument("--num-beams", type=int,
                         help="beam width (default: the model's training run's num_beams, else 3 as the release)")
    caption.add_argument("--max-length", type=int, help="most tokens per caption, BOS and EOS included (default: "
                         "the run's max_decode_len or max_text_len, else 32)")
    caption.add_argument("--min-length", type=int, help="fewest tokens per caption, BOS and EOS included "
                         "(default 3: at least one word)")
    caption.add_argument("--length-penalty", type=float,
                         help="score / length ** penalty (default: the run's length_penalty, else 0.6)")
    caption.add_argument("--mask-token-id", type=int, help="id of the tokenizer's <mask> piece, which decoding "
                         "appends (default: the tokenizer's)")
    caption.set_defaults(func=run_caption, task_name=spec.name)


def add_vqa(kinds: argparse._SubParsersAction, spec: Any) -> None:
    """`beit3 predict {spec.verb}`."""
    vqa = _add_kind(
        kinds, spec, "answer a question about images (Beit3ForVisualQuestionAnswering)",
        "Ask each image a question and list the top-k answers with their probabilities (the sigmoid of each "
        "answer's logit: the model is trained with binary cross-entropy). Answer names come from --answers, "
        "labels.txt or answer2label.txt in the model folder, or the answer2label.txt under the run's data.root.",
        _examples('beit3 predict vqa --model runs/vqa/final --question "what is on the table?" photo.jpg',
                  'beit3 predict vqa --model runs/vqa/final --question "how many dogs?" --question "is it sunny?" '
                  "photos/ --output answers.csv",
                  'beit3 predict vqa --model DIR --answers data/index/answer2label.txt --question "..." photo.jpg'),
        top_k=True)
    vqa.add_argument("images", nargs="+", type=Path, help="image files and/or folders")
    vqa.add_argument("--question", required=True, action="append",
                     help="the question; repeat to ask several (each is asked of every image)")
    vqa.add_argument("--answers", type=Path, help="answer names: answer2label.txt or a text file, line i = label i")
    vqa.set_defaults(func=run_vqa, task_name=spec.name)


def add_classify(kinds: argparse._SubParsersAction, spec: Any) -> None:
    """`beit3 predict {spec.verb}`."""
    classify = _add_kind(
        kinds, spec, "classify images (Beit3ForImageClassification)",
        "List the top-k classes of each image with their softmax probabilities. Class names come from "
        "--labels, labels.txt or imagenet.classes.txt in the model folder, or the run's data.root.",
        _examples("beit3 predict classify --model runs/imagenet/final photo.jpg",
                  "beit3 predict classify --model DIR --labels imagenet.classes.txt photos/ --output labels.csv"),
        text=False, top_k=True)
    classify.add_argument("images", nargs="+", type=Path, help="image files and/or folders")
    classify.add_argument("--labels", type=Path, help="class names, one a line (line i = class i)")
    classify.set_defaults(func=run_classify, task_name=spec.name)


def add_nlvr2(kinds: argparse._SubParsersAction, spec: Any) -> None:
    """`beit3 predict {spec.verb}`."""
    nlvr2 = _add_kind(
        kinds, spec, "is a statement true of two images? (Beit3ForVisualReasoning)",
        "Judge a statement about a left and a right image: true or false, with the probability that it is "
        "true. --pairs reads many from a CSV file with columns left,right,statement (relative image paths are "
        "taken from the CSV file's folder).",
        _examples('beit3 predict nlvr2 --model runs/nlvr2/final --statement "there are two dogs" left.jpg right.jpg',
                  "beit3 predict nlvr2 --model runs/nlvr2/final --pairs pairs.csv --output judged.csv"), folders=False)
    nlvr2.add_argument("images", nargs="*", type=Path, help="LEFT RIGHT image files (without --pairs)")
    nlvr2.add_argument("--statement", help="the statement to judge (without --pairs)")
    nlvr2.add_argument("--pairs", type=Path, help="CSV file with columns left,right,statement")
    nlvr2.set_defaults(func=run_nlvr2, task_name=spec.name)


def add_zero_shot(kinds: argparse._SubParsersAction, spec: Any) -> None:
    """`beit3 predict {spec.verb}`."""
    zero_shot = _add_kind(
        kinds, spec, "classify images into classes named at run time (Beit3ForImageTextRetrieval)",
        "Zero-shot classification with a retrieval model: each class name (underscores read as spaces) is put "
        "in prompt templates ('a photo of a {}.', ...), the text embeddings of a class are averaged, and each "
        "image gets the classes whose embeddings are closest. --classes is a text file of names, or a folder of "
        "class folders (ImageNet layout); with a folder, --evaluate also predicts every image in it and reports "
        "top-1 / top-5 accuracy.",
        _examples("beit3 predict zero-shot --model runs/retrieval/final --classes names.txt photo.jpg photos/",
                  "beit3 predict zero-shot --model runs/retrieval/final --classes imagenet/val --evaluate "
                  "--output zero_shot.json",
                  "beit3 predict zero-shot --model DIR --classes names.txt --templates prompts.txt photos/"),
        top_k=True)
    zero_shot.add_argument("images", nargs="*", type=Path, help="image files and/or folders")
    zero_shot.add_argument("--classes", required=True, type=Path,
                           help="a text file of class names, one a line, or a folder of class folders")
    zero_shot.add_argument("--templates", type=Path, help="prompt templates, one a line, each with {} for the name")
    zero_shot.add_argument("--evaluate", action="store_true",
                           help="also predict every image in the --classes folder and report accuracy")
    zero_shot.set_defaults(func=run_zero_shot, task_name=spec.name)


# ------------------------------------------------------------------ running
def _pipeline(task: str, args: argparse.Namespace, **options: Any):
    from beit3.pipelines import pipeline, resolve_device
    from beit3.tasks.predict_io import check_output_path

    check_output_path(args.output)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if getattr(args, "top_k", 1) < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    device = resolve_device(args.device)  # a device this machine lacks fails before the model loads
    pipe = pipeline(task, args.model, tokenizer=getattr(args, "tokenizer", None), batch_size=args.batch_size,
                    device=device, backend=getattr(args, "backend", "torch"), **options)
    if getattr(pipe, "labels", None) is not None and pipe.labels_source is None:
        flag = "--answers" if hasattr(args, "answers") else "--labels"
        print(f"note: no label names found for {args.model}; showing label numbers. Pass {flag} FILE, or put "
              "labels.txt (line i names label i) in the model folder.", file=sys.stderr)
    return pipe


def _images(args: argparse.Namespace, report: Any, inputs: Any = None) -> list[Path]:
    """The image files named and in the folders named (sub-folders with --recursive)."""
    from beit3.tasks.predict_io import list_images

    return list_images(args.images if inputs is None else inputs, report, recursive=args.recursive)


def _require_text(texts: list[str], what: str, where: str = "") -> None:
    """An empty question or statement is refused before anything is loaded."""
    for number, text in enumerate(texts, start=1):
        if not text.strip():
            at = f" in {where}, row {number} under the header" if where else \
                (f" (number {number} of {len(texts)})" if len(texts) > 1 else "")
            raise ValueError(f"{what} is empty{at}: give the text to ask or judge")


def _summary(kind: str, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    return {"task": kind, "model": str(args.model), **extra}


def run_caption(args: argparse.Namespace) -> int:
    from beit3.tasks.predict_io import InputReport, finish, load_images

    generation = {"num_beams": args.num_beams, "max_length": args.max_length, "min_length": args.min_length,
                  "length_penalty": args.length_penalty}
    generation = {key: value for key, value in generation.items() if value is not None}
    pipe = _pipeline(args.task_name, args, generation=generation, mask_token_id=args.mask_token_id)
    report = InputReport()
    records = []
    for chunk in load_images(_images(args, report), args.batch_size, report, args.kind):
        results = pipe([image for _, image in chunk])
        records += [{"image": str(path), **result} for (path, _), result in zip(chunk, results)]
    return finish(records, report, args.output, _summary(args.kind, args, generation=pipe.generation))


def run_vqa(args: argparse.Namespace) -> int:
    from beit3.tasks.predict_io import InputReport, finish, load_images

    _require_text(args.question, "--question")
    pipe = _pipeline(args.task_name, args, labels=args.answers)
    report = InputReport()
    records = []
    for chunk in load_images(_images(args, report), args.batch_size, report, args.kind):
        images = [image for _, image in chunk]
        for question in args.question:
            answers = pipe(images, question, top_k=args.top_k)
            records += [{"image": str(path), "question": question, "answers": ranked}
                        for (path, _), ranked in zip(chunk, answers)]
    return finish(records, report, args.output, _summary(args.kind, args))


def run_classify(args: argparse.Namespace) -> int:
    from beit3.tasks.predict_io import InputReport, finish, load_images

    pipe = _pipeline(args.task_name, args, labels=args.labels)
    report = InputReport()
    records = []
    for chunk in load_images(_images(args, report), args.batch_size, report, args.kind):
        ranked = pipe([image for _, image in chunk], top_k=args.top_k)
        records += [{"image": str(path), "labels": labels} for (path, _), labels in zip(chunk, ranked)]
    return finish(records, report, args.output, _summary(args.kind, args))


def read_pairs(path: Path) -> list[tuple[Path, Path, str]]:
    """(left, right, statement) rows of a CSV file with those columns; relative paths are from its folder."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"left", "right", "statement"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path} needs the columns left,right,statement (missing: {', '.join(sorted(missing))})")
        rows = [(path.parent / row["left"], path.parent / row["right"], row["statement"]) for row in reader]
    if not rows:
        raise ValueError(f"{path} has no rows under its left,right,statement header")
    return rows


def run_nlvr2(args: argparse.Namespace) -> int:
    from beit3.tasks.predict_io import InputReport, finish, load_groups

    if args.pairs is not None:
        if args.images or args.statement:
            raise ValueError("give either --pairs FILE.csv, or --statement with LEFT RIGHT, not both")
        rows = read_pairs(args.pairs)
        _require_text([statement for _, _, statement in rows], "the statement", str(args.pairs))
    elif args.statement is None or len(args.images) != 2:
        raise ValueError("give --statement \"...\" and exactly two images, LEFT RIGHT (or --pairs FILE.csv)")
    else:
        _require_text([args.statement], "--statement")
        rows = [(args.images[0], args.images[1], args.statement)]
    pipe = _pipeline(args.task_name, args)
    report = InputReport()
    records = []
    for chunk in load_groups([(left, right) for left, right, _ in rows], args.batch_size, report, args.kind):
        statements = [rows[index][2] for index, _ in chunk]
        results = pipe([images for _, images in chunk], statements)
        records += [{"left": str(rows[index][0]), "right": str(rows[index][1]), "statement": statement, **result}
                    for (index, _), statement, result in zip(chunk, statements, results)]
    return finish(records, report, args.output, _summary(args.kind, args))


def read_classes(path: Path) -> tuple[list[str], dict[str, list[Path]]]:
    """(class names, images by class) from a folder of class folders, or (names, {}) from a text file."""
    if path.is_dir():
        folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise ValueError(f"{path} has no class folders; give a folder of class folders (ImageNet layout) "
                             "or a text file of class names")
        return [p.name for p in folders], {p.name: [p] for p in folders}
    if not path.is_file():
        raise FileNotFoundError(f"--classes {path}: no such file or folder")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path} names no classes; write one class name a line")
    return names, {}


def read_templates(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [line for line in lines if "{}" not in line]
    if not lines or bad:
        raise ValueError(f"{path}: every template needs {{}} where the class name goes "
                         f"(e.g. 'a photo of a {{}}.'); {'no templates' if not lines else f'not in: {bad[0]!r}'}")
    return lines


def run_zero_shot(args: argparse.Namespace) -> int:
    from beit3.pipelines import DEFAULT_TEMPLATES
    from beit3.tasks.predict_io import InputReport, finish, load_images

    classes, folders = read_classes(args.classes)
    if args.evaluate and not folders:
        raise ValueError("--evaluate needs --classes to be a folder of class folders (the images to score)")
    if not args.images and not args.evaluate:
        raise ValueError("give images to classify, or --evaluate with a --classes folder of class folders")
    templates = read_templates(args.templates) if args.templates else DEFAULT_TEMPLATES
    pipe = _pipeline(args.task_name, args, classes=classes, templates=templates)
    report = InputReport()
    paths = _images(args, report)
    truth: dict[Path, int] = {}
    if args.evaluate:
        for index, name in enumerate(classes):
            for path in _images(args, report, folders[name]):
                truth[path] = index
                paths.append(path)
    records, hits1, hits5 = [], 0, 0
    for chunk in load_images(paths, args.batch_size, report, args.kind):
        # accuracy needs the top 5 even when fewer are listed
        ranked = pipe([image for _, image in chunk], top_k=max(args.top_k, 5) if truth else args.top_k)
        for (path, _), labels in zip(chunk, ranked):
            record: dict[str, Any] = {"image": str(path)}
            if path in truth:
                true_label = pipe.classes[truth[path]]
                record["true_label"] = true_label
                names = [item["label"] for item in labels]
                hits1 += names[:1] == [true_label]
                hits5 += true_label in names[:5]
            records.append({**record, "labels": labels[:args.top_k]})
    scored = sum("true_label" in record for record in records)
    metrics = {"images": scored, "top1_accuracy": 100 * hits1 / scored,
               "top5_accuracy": 100 * hits5 / scored} if scored else {}
    code = finish(records, report, args.output,
                  _summary(args.kind, args, classes=pipe.classes, templates=pipe.templates,
                           **({"metrics": metrics} if metrics else {})))
    if metrics:
        print(f"zero-shot accuracy over {metrics['images']} images: top-1 {metrics['top1_accuracy']:.2f} %, "
              f"top-5 {metrics['top5_accuracy']:.2f} % ({len(classes)} classes)")
    return code
