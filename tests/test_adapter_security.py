"""Adapter files from untrusted clients: safetensors only, bounded reads, paths inside the root.

`load_adapter` must refuse a hostile adapter from its header alone (a pickle is never opened, a
header's size is checked before it is read, tensor shapes before any tensor is read), and over
gRPC each refused load must leave the worker serving: the same request gives the same tokens
after every bad load as before the first.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct

import grpc
import numpy as np
import pytest

import carajax
from carajax import _safetensors
from carajax.client import Client, ServerError
from carajax.config import EngineConfig
from carajax.lora.adapter import MAX_CONFIG_BYTES, WEIGHTS_FILE
from carajax.models import weights
from carajax.models.tokenizer import ByteTokenizer
from carajax.server.adapter_paths import AdapterPathPolicy
from carajax.server.worker import serve
from carajax.testing import write_random_adapter

Code = grpc.StatusCode


class _Payload:
    """Unpickling this makes a directory: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def pickle_only_adapter(path, config, marker) -> str:
    """A PEFT directory whose weights are `adapter_model.bin`, a pickle that runs code."""
    write_random_adapter(path, config, rank=8)
    os.remove(os.path.join(path, WEIGHTS_FILE))
    with open(os.path.join(path, "adapter_model.bin"), "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    return str(path)


def header_size_lie(path, config, declared: int) -> str:
    """A valid adapter whose weights file claims a `declared`-byte header (8 + 8 bytes long)."""
    write_random_adapter(path, config, rank=8)
    with open(os.path.join(path, WEIGHTS_FILE), "wb") as f:
        f.write(struct.pack("<Q", declared) + b"{}      ")
    return str(path)


def truncated(path, config) -> str:
    """A valid adapter with its weights file cut in the middle of the tensor data."""
    write_random_adapter(path, config, rank=8)
    file = os.path.join(path, WEIGHTS_FILE)
    os.truncate(file, os.path.getsize(file) - 100)
    return str(path)


def _header_only_file(file, header: dict, data_bytes: int) -> None:
    """A safetensors file with `header` and `data_bytes` zero bytes of data."""
    head = json.dumps(header).encode()
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + bytes(data_bytes))


# -- load_adapter -----------------------------------------------------------------------------
def test_a_pickle_only_adapter_is_refused_without_unpickling(tmp_path, tiny_config):
    marker = tmp_path / "unpickled"
    path = pickle_only_adapter(tmp_path / "a", tiny_config, marker)
    with pytest.raises(carajax.AdapterError, match="safetensors is required") as err:
        carajax.load_adapter(path, tiny_config, max_rank=64)
    assert "adapter_model.bin" in str(err.value)
    assert not marker.exists()
    with open(os.path.join(path, "adapter_model.bin"), "rb") as f:  # the payload is live: had
        pickle.load(f)  # the loader unpickled it, the marker would have been made
    assert marker.exists()


def test_beside_a_pickle_the_safetensors_weights_are_read_and_the_pickle_is_not(tmp_path, tiny_config):
    marker = tmp_path / "unpickled"
    path = write_random_adapter(tmp_path / "a", tiny_config, rank=8)
    with open(os.path.join(path, "adapter_model.bin"), "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    assert carajax.load_adapter(path, tiny_config, max_rank=64).rank == 8
    assert not marker.exists()


def test_a_header_of_a_terabyte_is_refused_before_it_is_read(tmp_path, tiny_config):
    # 16 bytes on disk claiming a 10^12-byte header: refused on the size alone (a reader that
    # tried to read it first would fail differently, or allocate a terabyte).
    path = header_size_lie(tmp_path / "a", tiny_config, 10**12)
    assert os.path.getsize(os.path.join(path, WEIGHTS_FILE)) == 16
    with pytest.raises(carajax.AdapterError, match=r"header too large \(1000000000000 bytes"):
        carajax.load_adapter(path, tiny_config, max_rank=64)


def test_a_header_longer_than_its_file_is_truncated(tmp_path, tiny_config):
    path = header_size_lie(tmp_path / "a", tiny_config, 1000)  # under the limit, over the file
    with pytest.raises(carajax.AdapterError, match="header size 1000 exceeds the file"):
        carajax.load_adapter(path, tiny_config, max_rank=64)


def test_a_truncated_weights_file_is_refused(tmp_path, tiny_config):
    with pytest.raises(carajax.AdapterError, match="is truncated"):
        carajax.load_adapter(truncated(tmp_path / "a", tiny_config), tiny_config, max_rank=64)


def test_a_file_over_the_size_limit_is_refused(tmp_path, tiny_config):
    path = write_random_adapter(tmp_path / "a", tiny_config, rank=8)
    size = os.path.getsize(os.path.join(path, WEIGHTS_FILE))
    assert carajax.load_adapter(path, tiny_config, max_rank=64, max_bytes=size).rank == 8
    with pytest.raises(carajax.AdapterError, match=f"{size} bytes, over the limit of {size - 1}"):
        carajax.load_adapter(path, tiny_config, max_rank=64, max_bytes=size - 1)


def test_shapes_and_ranks_are_checked_from_the_header_before_any_tensor_is_read(
        tmp_path, tiny_config, monkeypatch):
    d_in, d_out = tiny_config.projection_shape("q_proj")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    cases = [  # the header's shapes (the data: zeros of the declared size), and the complaint
        (((8, 3), (d_out, 8)), f"lora_A (8, 3) and lora_B ({d_out}, 8); the base model needs "
                               f"lora_A [r, {d_in}]"),
        (((128, d_in), (d_out, 128)), "rank 128 of model.layers.0.self_attn.q_proj exceeds the "
                                      "limit max_lora_rank=64"),
    ]
    read = []
    monkeypatch.setattr(_safetensors, "load", lambda *a, **k: read.append(a))
    for i, ((a, b), needle) in enumerate(cases):
        path = write_random_adapter(tmp_path / f"a{i}", tiny_config, rank=a[0])
        header, offset = {}, 0
        for ab, shape in zip("AB", (a, b)):
            n = int(np.prod(shape)) * 4
            header[key.format(ab)] = {"dtype": "F32", "shape": list(shape),
                                      "data_offsets": [offset, offset + n]}
            offset += n
        _header_only_file(os.path.join(path, WEIGHTS_FILE), header, offset)
        with pytest.raises(carajax.AdapterError, match=re.escape(needle)):
            carajax.load_adapter(path, tiny_config, max_rank=64)
    assert read == []  # refused from the header: no tensor was mapped or read


@pytest.mark.parametrize("header, needle", [
    ([1, 2, 3], "not a JSON object"),
    ({"x": "not an entry"}, "lacks dtype, shape or data_offsets"),
    ({"x": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 0]}}, "malformed shape"),
    ({"x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 0]}}, "malformed shape"),
    ({"x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}, "do not match its shape"),
    ({"x": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, "unsupported dtype Q4"),
])
def test_a_malformed_header_is_an_adapter_error_not_a_crash(tmp_path, tiny_config, header, needle):
    path = write_random_adapter(tmp_path / "a", tiny_config, rank=8)
    _header_only_file(os.path.join(path, WEIGHTS_FILE), header, 64)
    with pytest.raises(carajax.AdapterError, match=needle):
        carajax.load_adapter(path, tiny_config, max_rank=64)


def test_an_oversized_config_is_refused(tmp_path, tiny_config):
    path = write_random_adapter(tmp_path / "a", tiny_config, rank=8)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        f.write(" " * MAX_CONFIG_BYTES + "{}")
    with pytest.raises(carajax.AdapterError, match="not an adapter config"):
        carajax.load_adapter(path, tiny_config, max_rank=64)


# -- over gRPC --------------------------------------------------------------------------------
PROMPT, GREEDY = [2, 104, 105, 33], dict(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_config):
    model = weights.random_model(tiny_config, seed=0, init_std=0.1)
    eng = carajax.Engine(model, ByteTokenizer(), EngineConfig(max_batch_size=2, prefill_chunk=16,
                                                              cold_start="cached"))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_config):
    """The adapter root: a good adapter, hostile ones, and links out; plus one adapter outside."""
    base = tmp_path_factory.mktemp("security").resolve()
    root, outside = base / "root", base / "outside"
    write_random_adapter(root / "good", tiny_config, rank=8, seed=1)
    write_random_adapter(outside / "secret", tiny_config, rank=8, seed=2)
    pickle_only_adapter(root / "pickled", tiny_config, base / "unpickled")
    header_size_lie(root / "huge-header", tiny_config, 10**12)
    truncated(root / "truncated", tiny_config)
    (root / "link-out").symlink_to(outside / "secret", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def clients(engine, root):
    """A worker with the root, and one started without any (run-time loading off)."""
    with serve(engine, 0, host="127.0.0.1", name="rooted",
               adapter_paths=AdapterPathPolicy(root=str(root))) as rooted, \
            serve(engine, 0, host="127.0.0.1", name="closed") as closed, \
            Client(rooted.address, timeout=60) as a, Client(closed.address, timeout=60) as b:
        assert rooted.servicer.adapter_paths.root == str(root)  # what the HTTP front end reads
        yield a, b


BAD_LOADS = {
    "dot-dot": (lambda root: "../outside/secret", Code.PERMISSION_DENIED, "outside the adapter root"),
    "absolute outside": (lambda root: str(root.parent / "outside" / "secret"), Code.PERMISSION_DENIED,
                         "outside the adapter root"),
    "symlink out": (lambda root: "link-out", Code.PERMISSION_DENIED, "outside the adapter root"),
    "pickle only": (lambda root: "pickled", Code.INVALID_ARGUMENT, "safetensors is required"),
    "huge header": (lambda root: "huge-header", Code.INVALID_ARGUMENT, "header too large"),
    "truncated": (lambda root: "truncated", Code.INVALID_ARGUMENT, "is truncated"),
    "missing": (lambda root: "nowhere", Code.INVALID_ARGUMENT, "not a directory"),
}


def test_bad_loads_are_refused_and_the_worker_keeps_serving(engine, root, clients):
    rooted, _ = clients
    before = rooted.generate(PROMPT, **GREEDY).result().token_ids
    assert len(before) == 6
    for case, (path, code, needle) in BAD_LOADS.items():
        with pytest.raises(ServerError) as err:
            rooted.load_adapter("bad", path(root))
        assert (err.value.code, case) == (code, case), err.value
        assert needle in err.value.details, (case, err.value.details)
        assert str(root.parent / "outside") not in err.value.details or case == "absolute outside"
        assert rooted.generate(PROMPT, **GREEDY).result().token_ids == before, case
    assert "bad" not in engine.adapters
    assert not (root.parent / "unpickled").exists()


def test_a_load_inside_the_root_works_by_relative_path(engine, root, clients):
    rooted, _ = clients
    info = rooted.load_adapter("good", "good")
    assert (info.adapter_id, info.rank, info.path) == ("good", 8, str(root / "good"))
    try:
        out = rooted.generate(PROMPT, "good", **GREEDY).result()
        assert (out.adapter, len(out.token_ids)) == ("good", 6)
    finally:
        rooted.unload_adapter("good")


def test_without_a_root_run_time_loading_is_off(root, clients):
    _, closed = clients
    with pytest.raises(ServerError) as err:
        closed.load_adapter("good", str(root / "good"))
    assert err.value.code == Code.PERMISSION_DENIED
    assert "--adapter-root" in err.value.details and "closed" in err.value.details
    assert closed.generate(PROMPT, **GREEDY).result().finish_reason == "length"
