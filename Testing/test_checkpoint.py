from __future__ import annotations

import pytest
import torch

from DiffusionSegLib.checkpoint import load_training_state, load_weights, save_training_state, save_weights
from DiffusionSegLib.errors import UserInputError


def test_weights_round_trip_with_config_and_kind(tmp_path):
    module = torch.nn.Conv3d(2, 3, 3)
    path = save_weights(tmp_path / "m.safetensors", module.state_dict(), kind="bpr", config={"channels": [2, 3]},
                        extra={"steps": 5})  # fmt: skip
    state, config, meta = load_weights(path, kind="bpr")
    assert config == {"channels": [2, 3]} and meta["extra"] == {"steps": 5} and meta["kind"] == "bpr"
    torch.testing.assert_close(state["weight"], module.weight.detach())
    with pytest.raises(UserInputError, match="holds a bpr model; expected a probe"):
        load_weights(path, kind="probe")


def test_damaged_or_missing_files_are_refused_and_failed_writes_keep_the_old_file(tmp_path):
    path = tmp_path / "state.pt"
    save_training_state(path, {"step": 3})
    with pytest.raises((TypeError, AttributeError)):
        save_training_state(path, {"step": 4, "bad": lambda: None})  # not picklable
    assert load_training_state(path)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserInputError, match="cannot read weights"):
        load_weights(tmp_path / "bad.safetensors")
    with pytest.raises(UserInputError, match="not found"):
        load_weights(tmp_path / "none.safetensors")


def test_atomic_writes_get_normal_permissions(tmp_path):
    """Shipped or shared files must be readable by others: the temporary file's 0600 must not survive."""
    import os
    import stat

    previous = os.umask(0o022)
    try:
        path = save_weights(tmp_path / "w.safetensors", {"a": torch.zeros(2)}, kind="probe", config={})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
