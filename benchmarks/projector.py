"""Projector throughput (see benchmarks/README.md). Usage: python benchmarks/projector.py [--quick]"""
import sys

from fbsemlib.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "projector", *sys.argv[1:]]))
