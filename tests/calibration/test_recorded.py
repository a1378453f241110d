"""The recorded trajectories live in a temporary file: what goes in at (step, sample) comes back."""
import pytest
import torch

from ptqd.calibration.recorded import StepTensors


def test_blocks_written_by_chunk_read_back_by_step_and_by_sample_block():
    store = StepTensors(3, 5, (2, 4, 4))
    data = torch.randn(3, 5, 2, 4, 4)
    for step in range(3):
        for start in (0, 3):  # chunks of 3 and 2 samples, as --calib-batch 3 records them
            store.write(step, start, data[step, start:start + 3])
    assert store.shape == (3, 5, 2, 4, 4) and len(store) == 3
    for step in range(3):
        assert torch.equal(store[step], data[step])
        assert torch.equal(store[step, 1:4], data[step, 1:4])
    with pytest.raises(ValueError, match="does not fit"):
        store.write(0, 4, data[0, :2])
    store.close()
