"""DeepSpeed's files written through `engine.durable_files`: they load back with the weights-only
unpickler, and a full disk fails with the file's name and ENOSPC (on a real 1 MiB tmpfs)."""

from __future__ import annotations

import errno
import subprocess

import pytest
import torch

from pali3_train.engine.durable_files import DurableTorchCheckpointEngine


def test_a_saved_state_loads_back_weights_only(tmp_path):
    state = {"module": {"w": torch.arange(6.0).reshape(2, 3)}, "global_steps": 4}
    path = tmp_path / "mp_rank_00_model_states.pt"
    DurableTorchCheckpointEngine().save(state, str(path))
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["module"]["w"], state["module"]["w"])
    assert loaded["global_steps"] == 4


@pytest.fixture
def tiny_fs(tmp_path):
    mount = tmp_path / "fs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_names_the_file_and_the_cause(tiny_fs):
    path = tiny_fs / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with pytest.raises(OSError) as raised:
        DurableTorchCheckpointEngine().save({"exp_avg": torch.zeros(1 << 20)}, str(path))
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == str(path)
    assert "No space left on device" in str(raised.value)
