"""Outputs appear whole or not at all: full disks, interrupted runs, and sharded writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from support import sparsify_command
from sparsify.atomic_output import atomic_folder
from sparsify.checkpoint_writer import PlannedTensor, write_checkpoint
from sparsify.errors import SparsifyError
from sparsify.upcycle import upcycle


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 2 MB file system (tmpfs), so a full disk is a full disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)])


def test_not_enough_space_is_refused_before_writing(dense_models, tiny_disk):
    with pytest.raises(SparsifyError, match="not enough disk space"):
        upcycle(str(dense_models["llama"]), "moe", tiny_disk / "out", experts=8)
    assert list(tiny_disk.iterdir()) == []


def test_disk_filling_up_midway_leaves_nothing(tiny_disk):
    tensors = [PlannedTensor(f"t{i}", (256, 1024), torch.float32, lambda: torch.ones(256, 1024)) for i in range(4)]
    with pytest.raises(SparsifyError, match="disk filled up"):
        with atomic_folder(tiny_disk / "out") as staging:
            write_checkpoint(staging, tensors)
    assert list(tiny_disk.iterdir()) == []


def test_failure_keeps_the_previous_output(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "config.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with atomic_folder(output, overwrite=True) as staging:
            (staging / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (output / "config.json").read_text() == "{}"


def test_sharded_write_roundtrips(tmp_path):
    shapes = [(3, 5), (7,), (0, 4), (16, 16), (2, 2, 2)]
    originals = {f"w{i}": torch.randn(shape) for i, shape in enumerate(shapes)}
    planned = [PlannedTensor(n, tuple(t.shape), t.dtype, lambda t=t: t) for n, t in originals.items()]
    write_checkpoint(tmp_path, planned, max_shard_bytes=600)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    loaded = {}
    for file in files:
        loaded.update(load_file(tmp_path / file))
    assert loaded.keys() == originals.keys()
    for name, tensor in originals.items():
        assert torch.equal(loaded[name], tensor)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in originals.values())


@pytest.mark.slow
def test_interrupted_conversion_never_looks_finished(tmp_path):
    """Ctrl-C cleans up; even SIGKILL mid-write leaves no folder at the output path."""
    for sig in (signal.SIGINT, signal.SIGKILL):
        output = tmp_path / f"out-{sig.name}"
        process = subprocess.Popen(
            [*sparsify_command(), "upcycle", "smollm2-135m", "--to", "moe", "--experts", "4", "-o", str(output)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        deadline = time.time() + 300
        while not any(p.stat().st_size > 1e6 for p in tmp_path.glob(f".{output.name}.partial-*/*.safetensors")):
            assert process.poll() is None and time.time() < deadline, "conversion ended before it could be interrupted"
            time.sleep(0.05)
        process.send_signal(sig)
        process.wait(timeout=60)
        assert process.returncode != 0
        assert not output.exists()
        leftovers = list(tmp_path.glob(f".{output.name}.partial-*"))
        assert leftovers == [] if sig == signal.SIGINT else len(leftovers) == 1
