"""`python -m carajax ...` is the `carajax` command."""

from carajax.cli import main

if __name__ == "__main__":
    main()
