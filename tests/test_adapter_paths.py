"""AdapterPathPolicy: which run-time adapter paths a server reads (gRPC LoadAdapter, HTTP load).

The tree every test uses (built by the `tree` fixture):

    tmp/outside/secret/                 an adapter directory outside the root
    tmp/root/team/good/                 an adapter directory inside the root
    tmp/root/link-out   -> ../outside/secret        a directory link pointing out
    tmp/root/link-in    -> team/good                a directory link staying inside
    tmp/root/sneaky/adapter_config.json -> ../../outside/secret/adapter_config.json
    tmp/root/loop -> loop               a link to itself
"""

from __future__ import annotations

import os

import pytest

from carajax import AdapterError
from carajax.lora.adapter import ADAPTER_FILES
from carajax.server.adapter_paths import AdapterPathError, AdapterPathPolicy


@pytest.fixture
def tree(tmp_path):
    tmp_path = tmp_path.resolve()  # the expected paths are real ones
    def adapter_dir(path):
        path.mkdir(parents=True)
        for name in ADAPTER_FILES:
            (path / name).write_text("{}")
        return path

    root = tmp_path / "root"
    good = adapter_dir(root / "team" / "good")
    secret = adapter_dir(tmp_path / "outside" / "secret")
    (root / "link-out").symlink_to("../outside/secret", target_is_directory=True)
    (root / "link-in").symlink_to("team/good", target_is_directory=True)
    (root / "sneaky").mkdir()
    (root / "sneaky" / "adapter_config.json").symlink_to(secret / "adapter_config.json")
    (root / "loop").symlink_to("loop")
    return root, good, secret


def test_paths_inside_the_root_resolve_to_their_real_directory(tree):
    root, good, _ = tree
    policy = AdapterPathPolicy(root=str(root))
    assert policy.enabled
    assert policy.resolve("team/good") == good  # relative: under the root
    assert policy.resolve(str(good)) == good  # absolute, inside
    assert policy.resolve("team/../team/good") == good  # ".." that stays inside
    assert policy.resolve("link-in") == good  # a link whose target is inside


@pytest.mark.parametrize("path, why", [
    ("../outside/secret", "outside the adapter root"),  # ".." climbing out
    ("team/../../outside/secret", "outside the adapter root"),
    ("/etc", "outside the adapter root"),  # absolute, elsewhere
    ("link-out", "outside the adapter root"),  # a link inside pointing out
    ("sneaky", "adapter_config.json links outside the adapter root"),  # a file link pointing out
    ("loop", "cannot be resolved"),
    ("", "empty"),
    ("team/\0good", "malformed"),
])
def test_paths_leaving_the_root_are_refused(tree, path, why):
    root, _, secret = tree
    policy = AdapterPathPolicy(root=str(root))
    with pytest.raises(AdapterPathError, match=why) as err:
        policy.resolve(path)
    assert isinstance(err.value, AdapterError)  # callers that catch AdapterError still catch it
    assert str(secret) not in str(err.value)  # says no more than the client sent


def test_the_absolute_path_of_a_link_pointing_out_is_refused_too(tree):
    root, _, _ = tree
    with pytest.raises(AdapterPathError, match="outside"):
        AdapterPathPolicy(root=str(root)).resolve(str(root / "link-out"))


def test_without_a_root_loading_is_off_unless_any_path_is_allowed(tree):
    _, good, secret = tree
    off = AdapterPathPolicy()
    assert not off.enabled
    for path in (str(good), "team/good"):
        with pytest.raises(AdapterPathError, match="--adapter-root DIR, or --allow-any-adapter-path"):
            off.resolve(path)
    anywhere = AdapterPathPolicy(allow_any=True)
    assert anywhere.enabled
    assert anywhere.resolve(str(secret)) == secret
    link = secret.parent / "alias"
    os.symlink(secret, link)
    assert anywhere.resolve(str(link)) == secret  # still the real path: what gets loaded


def test_a_root_that_is_not_a_directory_is_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        AdapterPathPolicy(root=str(tmp_path / "missing"))


def test_describe_says_what_the_server_allows(tree):
    root, _, _ = tree
    assert AdapterPathPolicy().describe() == "run-time adapter loading off"
    assert AdapterPathPolicy(allow_any=True).describe() == "run-time adapter loading from any path"
    assert AdapterPathPolicy(root=str(root)).describe() == f"run-time adapter loading under {root}"
