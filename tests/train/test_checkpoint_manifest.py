"""Checkpoint manifests: every damaged file is named, --resume auto falls back to the newest good checkpoint and
continues bit-exactly, an explicit --resume PATH that is damaged fails before training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import small_config

from memzoo.train import ConfigError, train
from memzoo.train.checkpoint import (
    MANIFEST,
    CheckpointError,
    CheckpointWarning,
    resumable_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from memzoo.train.tracking import read_metrics

RUN = dict(train__max_steps=4, ckpt__every=2, ckpt__keep=5)
STREAM = {"data__pack": "stream", "model__mixers__attention__window": 24}
# The files Accelerate and the trainer write into every checkpoint of this run (stream packing adds its state).
FILES = ["model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl",
         "trainer_state.json", "stream_state_0.pt", "torch_rng_0.pt"]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss/train"] for r in read_metrics(run) if "loss/train" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 4-step run with checkpoints at steps 2 and 4 (stream packing: a carried state too)."""
    out = tmp_path_factory.mktemp("ref")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(small_config(out, **STREAM, **RUN))
    finally:
        torch.set_num_threads(n)
    return out


def copy_run(reference: Path, dest: Path) -> Path:
    shutil.copytree(reference, dest)
    return dest


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_every_checkpoint_has_a_manifest_of_all_its_files(reference):
    for step in (2, 4):
        folder = reference / "checkpoints" / f"checkpoint_{step}"
        files = json.loads((folder / MANIFEST).read_text())["files"]
        assert sorted(files) == sorted(FILES)
        for name, meta in files.items():
            assert meta["size"] == (folder / name).stat().st_size and len(meta["sha256"]) == 64
        verify_checkpoint(folder)


@pytest.mark.parametrize("name", FILES + [MANIFEST])
def test_auto_resume_skips_a_truncated_file_and_continues_bit_exactly(reference, tmp_path, name):
    run = copy_run(reference, tmp_path / "run")
    bad = run / "checkpoints" / "checkpoint_4"
    truncate(bad / name)
    shown = MANIFEST if name == MANIFEST else name
    with pytest.raises(CheckpointError, match=rf"checkpoint_4.*{shown}"):
        verify_checkpoint(bad)
    with pytest.warns(CheckpointWarning, match=rf"skipping checkpoint '.*checkpoint_4'.*{shown}"):
        summary = train(small_config(run, **STREAM, ckpt__resume="auto", **RUN))
    assert summary["step"] == 4
    # Steps 3-4 were dropped from the metrics and recomputed from checkpoint_2: bit-identical to the reference.
    assert losses(run) == losses(reference)
    verify_checkpoint(bad)  # rewritten whole by the resumed run


def test_a_flipped_byte_of_the_same_size_is_caught_by_the_checksum(reference, tmp_path):
    run = copy_run(reference, tmp_path / "run")
    path = run / "checkpoints" / "checkpoint_4" / "optimizer.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checkpoint_4'?: file optimizer.bin is corrupt \(its sha256"):
        verify_checkpoint(path.parent)
    with pytest.warns(CheckpointWarning, match="optimizer.bin"):
        assert resumable_checkpoint(run).name == "checkpoint_2"


def test_a_missing_file_and_a_missing_manifest_are_named(reference, tmp_path):
    run = copy_run(reference, tmp_path / "run")
    (run / "checkpoints" / "checkpoint_4" / "scheduler.bin").unlink()
    (run / "checkpoints" / "checkpoint_2" / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint_4'?: file scheduler.bin is missing"):
        verify_checkpoint(run / "checkpoints" / "checkpoint_4")
    # Nothing verifies: auto-resume refuses instead of silently starting from step 0.
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match=r"no checkpoint verifies.*"
                                                        r"scheduler.bin is missing.*checkpoint_2'? has no manifest"):
        resumable_checkpoint(run)
    with pytest.warns(CheckpointWarning), pytest.raises(ConfigError, match="no checkpoint verifies"):
        train(small_config(run, **STREAM, ckpt__resume="auto", **RUN))


def test_explicit_resume_of_a_damaged_checkpoint_fails_naming_the_file(reference, tmp_path):
    run = copy_run(reference, tmp_path / "run")
    bad = run / "checkpoints" / "checkpoint_4"
    truncate(bad / "random_states_0.pkl")
    with pytest.raises(ConfigError, match=r"checkpoint_4'?: file random_states_0.pkl has \d+ bytes, manifest.json "
                                          r"says \d+"):
        train(small_config(run, **STREAM, ckpt__resume=str(bad), **RUN))


def test_explicit_resume_without_manifest_is_accepted_unverified(reference, tmp_path):
    # A checkpoint from before manifests: an explicit PATH still resumes, with a warning saying it is unverified.
    run = copy_run(reference, tmp_path / "run")
    ckpt = run / "checkpoints" / "checkpoint_2"
    (ckpt / MANIFEST).unlink()
    with pytest.warns(CheckpointWarning, match="unverified"):
        summary = train(small_config(run, **STREAM, ckpt__resume=str(ckpt), train__max_steps=4,
                                     ckpt__every=2, ckpt__keep=5))
    assert summary["step"] == 4
    assert losses(run) == losses(reference)


def test_write_manifest_covers_nested_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "shard.bin").write_bytes(b"abc")
    (tmp_path / "trainer_state.json").write_text("{}")
    write_manifest(tmp_path)
    verify_checkpoint(tmp_path)
    (tmp_path / "sub" / "shard.bin").write_bytes(b"abd")
    with pytest.raises(CheckpointError, match="file sub/shard.bin is corrupt"):
        verify_checkpoint(tmp_path)
