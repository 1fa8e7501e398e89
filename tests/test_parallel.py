"""parallel.py's distributed checkpoints in one process: what save_checkpoint writes loads back exactly, nothing in a
checkpoint is unpickled beyond its own metadata classes and plain values, a full disk mid-save is one line and keeps
the previous checkpoint, and nothing planted at the save's temporary folder is followed."""

import errno
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import common
import parallel


class Payload:
    """A pickle that runs a command when loaded (what a planted file would hold)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def error_line(err: str) -> str:
    assert "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    return line


def trained(seed: int = 0):
    """A small model, its AdamW (state after one step) and a scheduler."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model(torch.randn(3, 5)).square().sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def save(out: Path, step: int, model, optimizer, scheduler) -> Path:
    with pytest.warns(UserWarning, match="single process"):  # no process group: DCP says so
        parallel.save_checkpoint(out, step, 3, model, optimizer, scheduler)
    return out / "checkpoints" / f"step-{step}"


def load(checkpoint: Path):
    model, optimizer, scheduler = trained(seed=1)  # other weights and moments: everything must come from the file
    state = parallel.checkpoint_state(checkpoint)
    with pytest.warns(UserWarning, match="single process"):
        step = parallel.load_checkpoint(checkpoint, state, model, optimizer, scheduler)
    return step, model, optimizer, scheduler


def test_a_checkpoint_loads_back_bit_exact(tmp_path):
    model, optimizer, scheduler = trained()
    checkpoint = save(tmp_path, 4, model, optimizer, scheduler)
    step, model2, optimizer2, scheduler2 = load(checkpoint)
    assert step == 4 and scheduler2.state_dict() == scheduler.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    s1, s2 = optimizer.state_dict(), optimizer2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert all(torch.equal(s1["state"][k][name], s2["state"][k][name]) for k in s1["state"] for name in s1["state"][k])


def test_a_planted_metadata_pickle_is_refused_and_a_plain_load_would_run_it(tmp_path, capsys):
    checkpoint = save(tmp_path, 1, *trained())
    marker = tmp_path / "it_ran"
    (checkpoint / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(SystemExit) as exit:
        parallel.checkpoint_state(checkpoint)
    line = error_line(capsys.readouterr().err)
    assert exit.value.code == 2 and str(checkpoint / ".metadata") in line and "not unpickled" in line
    assert not marker.exists()
    with open(checkpoint / ".metadata", "rb") as f:  # the file is live: torch's own reader (pickle.load) runs it
        pickle.load(f)
    assert marker.exists()


def test_metadata_naming_a_file_outside_the_checkpoint_is_refused(tmp_path, capsys):
    checkpoint = save(tmp_path, 1, *trained())
    with open(checkpoint / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    for info in metadata.storage_data.values():
        info.relative_path = "../../elsewhere.distcp"
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(SystemExit):
        parallel.checkpoint_state(checkpoint)
    assert str(checkpoint / ".metadata") in error_line(capsys.readouterr().err)


def test_a_planted_byte_item_is_refused_and_a_plain_load_would_run_it(tmp_path, capsys):
    model, optimizer, scheduler = trained()
    checkpoint = save(tmp_path, 1, model, optimizer, scheduler)
    marker = tmp_path / "it_ran"
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    optim_state["param_groups"][0]["lr"] = Payload(marker)  # a non-tensor value: stored as a pickled byte item
    with pytest.warns(UserWarning):  # one process; overwriting a checkpoint
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(checkpoint))
    assert not marker.exists()
    with pytest.raises(SystemExit) as exit:
        load(checkpoint)
    line = error_line(capsys.readouterr().err)
    assert exit.value.code == 2 and str(checkpoint) in line and "not unpickled" in line
    assert not marker.exists()
    model_state, optim_state = get_state_dict(model, optimizer)
    with pytest.warns(UserWarning, match="single process"):  # torch's default reader would run it
        dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(checkpoint))
    assert marker.exists()


def test_a_full_disk_mid_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    model, optimizer, scheduler = trained()
    save(tmp_path, 1, model, optimizer, scheduler)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", full)
    with pytest.raises(SystemExit) as exit, pytest.warns(UserWarning, match="single process"):
        common.run_main(lambda: parallel.save_checkpoint(tmp_path, 2, 3, model, optimizer, scheduler))
    line = error_line(capsys.readouterr().err)
    assert exit.value.code == 2 and str(tmp_path / "checkpoints" / "step-2.tmp") in line
    assert "No space left on device" in line
    monkeypatch.undo()
    assert parallel.latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-1"
    step, model2, _, _ = load(tmp_path / "checkpoints" / "step-1")  # the resume after it works
    assert step == 1 and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                             model2.state_dict().values()))
    parallel.remove_interrupted_saves(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1"]


def test_a_link_planted_at_the_save_folder_is_refused_not_followed(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out" / "checkpoints").mkdir(parents=True)
    (tmp_path / "out" / "checkpoints" / "step-1.tmp").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(SystemExit):
        common.run_main(lambda: parallel.save_checkpoint(tmp_path / "out", 1, 3, *trained()))
    assert str(tmp_path / "out" / "checkpoints" / "step-1.tmp") in error_line(capsys.readouterr().err)
    assert list(elsewhere.iterdir()) == []
