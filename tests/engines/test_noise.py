import numpy as np

from ptqd.runtime.noise import SampleNoise


def test_sample_noise_does_not_depend_on_batching():
    whole = SampleNoise(7, 0, 6, (1, 4, 4))
    parts = [SampleNoise(7, 0, 2, (1, 4, 4)), SampleNoise(7, 2, 4, (1, 4, 4))]
    first, z1 = whole.initial(), whole.step()
    np.testing.assert_array_equal(first, np.concatenate([p.initial() for p in parts]))
    np.testing.assert_array_equal(z1, np.concatenate([p.step() for p in parts]))
    assert not np.array_equal(first, z1)


def test_different_seeds_differ():
    a, b = SampleNoise(0, 0, 1, (8,)).initial(), SampleNoise(1, 0, 1, (8,)).initial()
    assert not np.array_equal(a, b)

