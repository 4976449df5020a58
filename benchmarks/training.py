"""Training benchmark (see benchmarks/README.md). Usage: python benchmarks/training.py [--quick] [--out DIR]"""
import sys

from fbsemlib.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "training", *sys.argv[1:]]))
