"""Entry point for subprocess tests: the `beit3` CLI restricted to the training commands."""
import argparse
import sys

from beit3.training.commands import register

parser = argparse.ArgumentParser(prog="beit3")
register(parser.add_subparsers(dest="command"))
args = parser.parse_args()
sys.exit(args.func(args))
