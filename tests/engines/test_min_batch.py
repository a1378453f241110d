"""MinBatch: engines whose batch profile starts above 1 (TensorRT) serve any smaller batch."""
import numpy as np

from ptqd.runtime.sampler import MinBatch


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


def test_min_batch_pads_conditioning_and_single_input_engines_alike():
    """A guided UNet's conditioning inputs are padded with its samples; a VAE decoder (one
    positional input) is padded the same way."""
    def unet(sample, timestep, encoder_hidden_states):
        assert len(sample) == len(timestep) == len(encoder_hidden_states) >= 4
        return sample + encoder_hidden_states.sum(axis=(1, 2))[:, None, None, None]

    x = np.ones((2, 1, 2, 2), dtype=np.float32)
    states = np.stack([np.full((3, 2), 1.0), np.full((3, 2), 2.0)]).astype(np.float32)
    out = MinBatch(unet, 4)(x, np.zeros(2, np.float32), encoder_hidden_states=states)
    np.testing.assert_array_equal(out[:, 0, 0, 0], [7.0, 13.0])

    def decoder(latents):
        assert len(latents) >= 4
        return latents * 3

    np.testing.assert_array_equal(MinBatch(decoder, 4)(x), x * 3)
