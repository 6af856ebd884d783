"""Bad arguments a new user meets: each is one line on stderr, `carajax CMD: error: ...`, and exit
status 2 (as argparse does for what it finds itself), found before anything is built, started or
written: no traceback, no model loaded, no worker, no log, no adapter cache."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from carajax.config import COLD_START_POLICIES

MISSING = "/nonexistent/carajax-test"


def run(tmp_path, *argv: str) -> subprocess.CompletedProcess:
    """`python -m carajax ARGV` in an empty directory, on the CPU."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "carajax", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def one_error_line(proc: subprocess.CompletedProcess, command: str) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"carajax {command}: error: "), lines[0]
    return lines[0]


def run_here(capsys, monkeypatch, tmp_path, *argv: str) -> subprocess.CompletedProcess:
    """`carajax ARGV` in this process (`cli.main`, the code `python -m carajax` runs), from an
    empty directory: a process costs seconds of imports per case; the tests below that start
    `python -m carajax` show what a shell sees (no traceback, status 2)."""
    from carajax import cli

    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(argv))
    return subprocess.CompletedProcess(argv, exit_.value.code, "", capsys.readouterr().err)


def test_python_m_carajax_help_lists_the_commands(tmp_path):
    proc = run(tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("demo", "simulate", "serve", "profile", "route", "ray", "replay"):
        assert command in proc.stdout


CASES = {  # argv -> what the one line says (the path, once)
    "simulate trace": (["simulate", "--trace", MISSING], f"--trace {MISSING}: no such file"),
    "simulate cost model": (["simulate", "--cost-model", MISSING], f"--cost-model {MISSING}: no such file"),
    "simulate policy": (["simulate", "--policies", "carajax,nope"], "--policies: unknown ['nope']"),
    "replay trace": (["replay", "--trace", MISSING], f"--trace {MISSING}: no such file"),
    "replay model": (["replay", "--model", "nosuch"], "--model nosuch: not a checkpoint directory, "
                     "GGUF file, model to pull (smollm2-135m-instruct) nor a preset"),
    "replay rank weights": (["replay", "--rank-weights", "1,2"], "one non-negative weight per rank "
                            "of --ranks (4)"),
    "replay engine config": (["replay", "--engine-config", "{oops"], "bad --engine-config"),
    "replay adapter dir": (["replay", "--adapter-dir", MISSING], f"--adapter-dir {MISSING}: no such "
                           "directory"),
    "serve adapters": (["serve", "--adapters", MISSING], f"--adapters {MISSING}: no such directory"),
    "serve model": (["serve", "--model", "nosuch"], "--model nosuch: not a checkpoint directory, "
                    "GGUF file, model to pull (smollm2-135m-instruct) nor a preset (carajax-demo, "),
    "serve model path": (["serve", "--model", MISSING], f"--model {MISSING}: no such file or "
                         "directory"),
    "serve adapter root": (["serve", "--adapter-root", MISSING], f"--adapter-root {MISSING}: no such "
                           "directory"),
    "serve root and any": (["serve", "--adapter-root", ".", "--allow-any-adapter-path"],
                           "--adapter-root and --allow-any-adapter-path exclude each other"),
    "serve engine config": (["serve", "--engine-config", '{"max_batch_size": 0}'],
                            "bad --engine-config: EngineConfig.max_batch_size must be positive"),
    "route cost model": (["route", "--workers", "h:1", "--cost-model", MISSING],
                         f"--cost-model {MISSING}: no such file"),
    "route workers": (["route", "--workers", "nohost"], "--workers 'nohost': expected comma-separated "
                      "HOST:PORT"),
    "profile model": (["profile", "--model", "nosuch"], "--model nosuch: not a checkpoint directory"),
    "ray engine config": (["ray", "--engine-config", '{"max_batch_size": 0}'],
                          "bad --engine-config: EngineConfig.max_batch_size must be positive"),
    "ray adapter root": (["ray", "--adapter-root", MISSING], f"--adapter-root {MISSING}: no such "
                         "directory"),
    "ray cost model": (["ray", "--cost-model", MISSING], f"--cost-model {MISSING}: no such file"),
}


def test_sizes_read_in_decimal_and_binary_units(capsys):
    from carajax import cli
    from carajax.cli.args import byte_size

    for argv, says in ((["serve", "--host-lora-budget", "12XB"], "'12XB': not a size"),
                       (["ray", "--host-lora-budget", "0MB"], "'0MB': must be > 0")):
        with pytest.raises(SystemExit) as e:  # argparse: status 2, usage and the error line
            cli.main(argv)
        assert e.value.code == 2
        assert f"carajax {argv[0]}: error: argument --host-lora-budget: {says}" in capsys.readouterr().err

    assert byte_size("268435456") == 2**28
    assert byte_size("256MiB") == byte_size("256 mib") == 2**28
    assert byte_size("1.5GB") == 1_500_000_000
    assert byte_size("4kb") == 4000 and byte_size("512B") == 512


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_argument_is_one_line_and_status_2(tmp_path, case, capsys, monkeypatch):
    argv, says = CASES[case]
    line = one_error_line(run_here(capsys, monkeypatch, tmp_path, *argv), argv[0])
    assert says in line, line
    if MISSING in argv:
        assert line.count(MISSING) == 1, line  # the path once, not repeated by each layer
    assert os.listdir(tmp_path) == []  # nothing written: no results, no logs


def test_in_a_process_a_bad_argument_is_one_line_and_status_2(tmp_path):
    argv, says = CASES["serve model"]
    assert says in one_error_line(run(tmp_path, *argv), "serve")
    assert os.listdir(tmp_path) == []


def test_serve_refuses_an_empty_adapters_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_error_line(run(tmp_path, "serve", "--adapters", str(empty)), "serve")
    assert line.endswith(f"--adapters {empty}: no adapter directories in it (folders holding "
                         "adapter_config.json and adapter_model.safetensors)")


def test_replay_checks_every_argument_before_starting_workers(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    t0 = time.monotonic()
    proc = run(tmp_path, "replay", "--cold-starts", "cached,bogus", "--out", str(out),
               "--adapter-cache", str(cache))
    line = one_error_line(proc, "replay")
    assert ("--cold-starts 'cached,bogus': unknown ['bogus']; choose from "
            + ", ".join(COLD_START_POLICIES)) in line
    assert not out.exists() and not cache.exists()  # no log, no adapter written
    assert time.monotonic() - t0 < 60  # an import and a check, not a worker's start (minutes)


def test_a_malformed_trace_names_its_line(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"arrival_s": 0, "prompt_tokens": 5, "output_tokens": 2}\n{"arrival_s": "soon"}\n')
    line = one_error_line(run(tmp_path, "simulate", "--trace", str(trace)), "simulate")
    assert f"{trace}:2: " in line
