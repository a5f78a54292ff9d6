"""Trainer checkpoints: discovery of committed steps, pruning, RNG and optimizer state files,
background uploads, SIGTERM flag."""

from __future__ import annotations

import json
import os
import random
import signal

import numpy as np
import pytest
import torch

from mmjobs import storage
from mmjobs.train import checkpoint as ckpt


def _commit(root: str, step: int, *, manifest: bool = True) -> str:
    uri = ckpt.step_uri(root, step)
    storage.write_text(storage.join(uri, "state.json"), json.dumps({"step": step}))
    if manifest:
        storage.commit_dir(uri, meta={"fingerprint": "fp"})
    return uri


def test_latest_committed_skips_directories_without_a_manifest(tmp_path):
    root = str(tmp_path / "checkpoints")
    assert ckpt.latest_committed(root) is None
    _commit(root, 4)
    _commit(root, 12)
    _commit(root, 16, manifest=False)  # an upload killed half-way
    info = ckpt.latest_committed(root)
    assert (info.step, info.committed) == (12, True)
    assert [(i.step, i.committed) for i in ckpt.list_checkpoints(root)] == [
        (4, True), (12, True), (16, False)]


def test_prune_keeps_the_newest_and_drops_leftovers_below(tmp_path):
    root = str(tmp_path / "checkpoints")
    for step in (2, 4, 6):
        _commit(root, step)
    _commit(root, 5, manifest=False)  # stale partial upload
    _commit(root, 9, manifest=False)  # newer than the commit: maybe in flight, keep it
    assert ckpt.prune(root, keep=2, newest=6) == [2, 5]
    assert [i.step for i in ckpt.list_checkpoints(root)] == [4, 6, 9]


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    ckpt.save_torch(ckpt.capture_rng(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.restore_rng(ckpt.load_torch(tmp_path / "rng.pt"))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_optimizer_and_scheduler_state_load_with_weights_only(tmp_path):
    from mmjobs.train.schedules import build_lr_scheduler

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = build_lr_scheduler(opt, "cyclic_triangular2", num_training_steps=10)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    ckpt.save_torch(opt.state_dict(), tmp_path / "opt.pt")
    ckpt.save_torch(sched.state_dict(), tmp_path / "sched.pt")
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    sched2 = build_lr_scheduler(opt2, "cyclic_triangular2", num_training_steps=10)
    opt2.load_state_dict(ckpt.load_torch(tmp_path / "opt.pt"))
    sched2.load_state_dict(ckpt.load_torch(tmp_path / "sched.pt"))
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state[model.weight]["exp_avg"])
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_weights_only_refuses_pickled_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match=r"[Ww]eights only"):
        ckpt.load_torch(tmp_path / "evil.pt")


def test_uploader_commits_in_the_background_and_prunes(tmp_path):
    root = str(tmp_path / "store" / "checkpoints")
    up = ckpt.CheckpointUploader(root, rank=0, world_size=1, nonce="n", keep=2)
    for step in (1, 2, 3):
        local = up.staging_dir()
        (local / "state.json").write_text(json.dumps({"step": step}))
        (local / "ranks" / "rank-0").mkdir(parents=True)
        (local / "ranks" / "rank-0" / "loader.json").write_text("{}")
        up.commit(local, step, {"fingerprint": "fp"})
    up.wait()
    assert [(i.step, i.committed) for i in ckpt.list_checkpoints(root)] == [(2, True), (3, True)]
    manifest = storage.read_manifest(ckpt.step_uri(root, 3))
    assert manifest.meta == {"fingerprint": "fp", "step": 3}
    assert ckpt.fetch_checkpoint(ckpt.step_uri(root, 3), tmp_path / "got", rank=0) == {
        "step": 3}
    assert not local.exists()  # the staging directory is removed once uploaded


def test_uploader_gathers_every_ranks_files_before_committing(tmp_path):
    root = str(tmp_path / "checkpoints")
    ups = [ckpt.CheckpointUploader(root, rank=r, world_size=2, nonce="abc", keep=3,
                                   marker_timeout=30) for r in (1, 0)]
    for up in ups:  # rank 1 first: rank 0 must wait for its marker either way
        local = up.staging_dir()
        (local / "ranks" / f"rank-{up.rank}").mkdir(parents=True)
        (local / "ranks" / f"rank-{up.rank}" / "rng.pt").write_bytes(b"r%d" % up.rank)
        if up.rank == 0:
            (local / "state.json").write_text("{}")
        up.commit(local, 7, {"fingerprint": "fp"})
    for up in ups:
        up.wait()
    manifest = storage.read_manifest(ckpt.step_uri(root, 7))
    assert sorted(f.path for f in manifest.files) == [
        "ranks/rank-0/rng.pt", "ranks/rank-1/rng.pt", "state.json"]
    # Each rank downloads the shared files and its own, never the other ranks'.
    ckpt.fetch_checkpoint(ckpt.step_uri(root, 7), tmp_path / "r1", rank=1)
    assert (tmp_path / "r1" / "ranks" / "rank-1" / "rng.pt").read_bytes() == b"r1"
    assert not (tmp_path / "r1" / "ranks" / "rank-0").exists()


def test_upload_errors_surface_at_the_next_wait(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    up = ckpt.CheckpointUploader(str(blocker / "checkpoints"), rank=0, world_size=1,
                                 nonce="n", keep=1)
    local = up.staging_dir()
    (local / "state.json").write_text("{}")
    up.commit(local, 1, {})
    with pytest.raises(RuntimeError, match="checkpoint upload failed"):
        up.wait()
    assert not local.exists()  # staging is cleaned up even on failure


def test_sigterm_only_sets_a_flag():
    watcher = ckpt.PreemptionWatcher()
    watcher.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert watcher.requested
    finally:
        watcher.uninstall()
    assert signal.getsignal(signal.SIGTERM) is not watcher._handle
