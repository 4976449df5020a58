"""Simulation benchmark (see benchmarks/README.md). Usage: python benchmarks/simulation.py [--quick] [--out DIR]"""
import sys

from fbsemlib.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "simulation", *sys.argv[1:]]))
