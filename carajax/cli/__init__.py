"""The `carajax` command line. A value after a flag is its default; CAPITALS stand for your values.

    carajax demo [--model carajax-demo] [--words hello,carajax,serving]
                                                          the base and every trained adapter, one batch
    carajax pull smollm2-135m-instruct                    fetch a real model into $CARAJAX_HOME (once);
                                                          prints its directory
    carajax simulate [--workers 60] [--adapters 40000] [--scale 1.0] [--step-noise PROFILE] [--json OUT]
                                                          route a trace through the cluster simulator
    carajax serve [--model carajax-demo] [--adapters DIR] [--port 50051] [--metrics-port PORT]
                  [--http-port PORT] [--api-key KEY]      a gRPC worker (+ the OpenAI HTTP API);
                                                          prints one line when ready:
                                                          "carajax worker NAME ready on HOST:PORT ..."
    carajax profile [--model llama-test] [--grid quick] [--out profile.json] [--fit COSTMODEL.json]
                    [--plot PNG]                          time real engine steps, fit cost models
    carajax route --workers HOST:PORT,HOST:PORT [--policy carajax] [--port 50050] [--http-port PORT]
                                                          the router in front of workers; prints
                                                          "carajax router ready on HOST:PORT ..."
    carajax ray [--replicas 2] [--policy carajax] [--http-port 8000] [--address ADDRESS] [--api-key KEY]
                                                          Ray Serve: replicas + our router;
                                                          "carajax on Ray Serve ready at URL ..."
    carajax replay [--scale 0.5] [--cold-starts cached,wait,async,cpu_assist,auto] [--mode cluster]
                                                          replay a trace open-loop, compare policies:
                                                          table, JSON and plots in results/replay

`carajax COMMAND --help` describes every flag of a command.
"""

from __future__ import annotations

import argparse
import sys

from carajax.cli.args import UsageError, model_config_arg


def build_parser() -> argparse.ArgumentParser:
    """The `carajax` parser: one subcommand per module of this package, each module's docstring
    its description and its `add_*_args` its flags; `func` is the command to run."""
    from carajax.cli import demo, profile, pull, ray, replay, route, serve, simulate

    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="carajax", description=__doc__, formatter_class=raw)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module, add_args, run in (
            ("demo", demo, demo.add_demo_args, demo.demo_cmd),
            ("pull", pull, pull.add_pull_args, pull.pull_cmd),
            ("simulate", simulate, simulate.add_simulate_args, simulate.simulate_cmd),
            ("serve", serve, serve.add_serve_args, serve.serve_cmd),
            ("profile", profile, profile.add_profile_args, profile.profile_cmd),
            ("route", route, route.add_route_args, route.route_cmd),
            ("ray", ray, ray.add_ray_args, ray.ray_cmd),
            ("replay", replay, replay.add_replay_args, replay.replay_cmd)):
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__, formatter_class=raw)
        add_args(p)
        p.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` (default: sys.argv[1:]) and run its command. A `UsageError` is printed as one
    line, `carajax CMD: error: ...`, and exits with status 2."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UsageError as e:
        e.message = f"carajax {args.command}: error: {e.message}"
        print(e.message, file=sys.stderr)
        raise


__all__ = ["UsageError", "build_parser", "main", "model_config_arg"]
