"""``beit3 serve``: the fine-tuned models and an image index over HTTP, with a web page.

The command needs the ``serve`` extra (``pip install 'beit3[serve]'``: FastAPI, uvicorn,
python-multipart); it is imported only when the server starts, so ``beit3 --help`` and the
other commands never need it. See docs/serve.md.
"""
from __future__ import annotations

import argparse
import os
import sys

EXAMPLES = """examples:
  beit3 serve --model runs/coco_captioning/final
  beit3 serve --model runs/cap/final --model runs/vqa/final --model runs/imagenet/final --index photos.index
  beit3 serve --index photos.index --port 8080 --api-key s3cret
  beit3 serve --model runs/cap/final --max-batch 16 --max-wait-ms 20 --queue-size 128 --timeout-s 60
  beit3 serve --model runs/cap/final --host 0.0.0.0 --api-key s3cret --device cuda
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from beit3.cli import summary

    serve = subparsers.add_parser(
        "serve", help=summary("serve"),
        description="Serve fine-tuned models (each folder's task read from its config.json: captioning, VQA, "
        "classification, NLVR2, retrieval for zero-shot) and an image index over HTTP: JSON endpoints, a web page "
        "at /, the API docs at /docs. Concurrent requests to one model are batched. Binds 127.0.0.1 unless --host "
        "says otherwise. Needs the serve extra: pip install 'beit3[serve]'.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--model", action="append", default=[], metavar="DIR",
                       help="a fine-tuned model folder (repeatable, one per task)")
    serve.add_argument("--index", metavar="DIR", help="an image index (`beit3 search index`) served by /search")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    serve.add_argument("--api-key", default=None, metavar="KEY",
                       help="require this key (header X-API-Key or Authorization: Bearer); default: $BEIT3_API_KEY")
    batching = serve.add_argument_group("batching")
    batching.add_argument("--max-batch", type=int, default=8, help="most requests per model call (1: no batching; "
                          "default: %(default)s)")
    batching.add_argument("--max-wait-ms", type=float, default=10.0,
                          help="how long a request waits for others to join its batch (default: %(default)s)")
    batching.add_argument("--queue-size", type=int, default=64,
                          help="requests waiting per model before 503 (default: %(default)s)")
    batching.add_argument("--timeout-s", type=float, default=30.0,
                          help="a request unanswered after this long gets 504 (default: %(default)s)")
    serve.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body (default: %(default)s)")
    serve.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:1 ... "
                       "(default: %(default)s)")
    serve.set_defaults(func=run_serve)


def config_from_args(args: argparse.Namespace):
    from beit3.serve.app import ServeConfig

    for name in ("max_batch", "queue_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.timeout_s <= 0 or args.max_wait_ms < 0 or args.max_upload_mb <= 0:
        raise ValueError("--timeout-s and --max-upload-mb must be positive, --max-wait-ms at least 0")
    return ServeConfig(models=args.model, index=args.index, host=args.host, port=args.port,
                       api_key=args.api_key or os.environ.get("BEIT3_API_KEY") or None, max_batch=args.max_batch,
                       max_wait_ms=args.max_wait_ms, queue_size=args.queue_size, timeout_s=args.timeout_s,
                       max_upload_mb=args.max_upload_mb, device=args.device)


def run_serve(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn", "python_multipart") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"beit3 serve needs {', '.join(missing)}, not installed here: pip install 'beit3[serve]'")
    import uvicorn
    from beit3.serve.app import Server, create_app, is_loopback

    config = config_from_args(args)
    if not is_loopback(config.host) and not config.api_key:
        print(f"warning: serving on {config.host} without an API key: anyone who can reach this machine can use "
              "the models and see the indexed images (add --api-key KEY or set BEIT3_API_KEY)", file=sys.stderr)
    server = Server(config)
    app = create_app(server)
    loaded = ", ".join(f"/{name}" for name in server.batchers) or "nothing"
    print(f"serving {loaded} on http://{config.host}:{config.port}/ (API docs at /docs)", file=sys.stderr)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    return 0
