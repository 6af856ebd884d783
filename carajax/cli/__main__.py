"""`python -m carajax.cli ...` is the `carajax` command (how the replay starts its workers)."""

from carajax.cli import main

if __name__ == "__main__":
    main()
