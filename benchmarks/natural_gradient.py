"""Same as ``python -m pnmf.benchmarks``: the natural-gradient benchmark (see --help)."""

from pnmf.benchmarks.__main__ import main

if __name__ == "__main__":
    main()
