"""`python -m lscape` (and so `torchrun -m lscape`) runs the command line."""

from lscape.cli import main

if __name__ == "__main__":
    main()
