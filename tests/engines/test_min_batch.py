"""MinBatch: engines whose batch profile starts above 1 (TensorRT) serve any smaller batch."""
import numpy as np

from ptqd.engines.sampler import MinBatch


def test_min_batch_pads_short_batches_and_keeps_each_sample():
    """An engine that refuses batches under 3 (a TensorRT profile 3..8) still serves 1 and 2."""
    seen = []

    def engine(sample, timestep):
        assert len(sample) >= 3, "batch below the profile"
        seen.append(len(sample))
        return sample * 2 + timestep[:, None, None, None]

    x = np.arange(2 * 4, dtype=np.float32).reshape(2, 1, 2, 2)
    t = np.array([5.0, 7.0], dtype=np.float32)
    out = MinBatch(engine, 3)(x, t)
    np.testing.assert_array_equal(out, x * 2 + t[:, None, None, None])
    assert seen == [3]
    assert len(MinBatch(engine, 3)(np.concatenate([x, x]), np.concatenate([t, t]))) == 4  # no padding
