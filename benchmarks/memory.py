"""Memory benchmark (see benchmarks/README.md). Usage: python benchmarks/memory.py [--quick] [--out DIR]"""
import sys

from fbsemlib.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "memory", *sys.argv[1:]]))
