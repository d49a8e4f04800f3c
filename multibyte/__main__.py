"""`python -m multibyte`: the command line (see multibyte/cli.py)."""

from multibyte.cli import main

if __name__ == "__main__":
    main()
