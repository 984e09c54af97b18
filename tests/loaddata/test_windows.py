"""Window helpers: bounds, uniform starts, gathers equal slicing, covering windows."""

import pytest
import torch

from kale_ext.loaddata.windows import all_windows, check_window, crop, random_crop, random_starts, window_starts


def test_check_window_bounds():
    assert check_window(0, 100) == 100
    assert check_window(40, 100) == 40
    with pytest.raises(ValueError, match="PRETRAIN.WINDOW"):
        check_window(101, 100)
    with pytest.raises(ValueError):
        check_window(-1, 100)


def test_random_starts_cover_every_start_and_stay_in_bounds():
    g = torch.Generator().manual_seed(0)
    starts = random_starts(20000, 10, 7, g)
    assert int(starts.min()) == 0 and int(starts.max()) == 3
    counts = torch.bincount(starts, minlength=4).float() / 20000
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.02)


def test_crop_equals_slicing():
    x = torch.randn(5, 3, 50)
    starts = torch.tensor([0, 3, 10, 43, 20])
    out = crop(x, starts, 7)
    for b in range(5):
        assert torch.equal(out[b], x[b, :, starts[b] : starts[b] + 7])


def test_random_crop_is_new_each_call_and_whole_for_zero():
    x = torch.arange(2 * 1 * 100, dtype=torch.float32).view(2, 1, 100)
    assert random_crop(x, 0) is x
    g = torch.Generator().manual_seed(1)
    a, b = random_crop(x, 10, g), random_crop(x, 10, g)
    assert a.shape == (2, 1, 10) and not torch.equal(a, b)


def test_window_starts_cover_the_record():
    for length, window, stride in [(100, 30, 0), (100, 25, 0), (100, 100, 0), (97, 20, 7)]:
        starts = window_starts(length, window, stride)
        covered = torch.zeros(length, dtype=torch.bool)
        for s in starts:
            assert 0 <= s <= length - window
            covered[s : s + window] = True
        assert bool(covered.all())
    assert window_starts(100, 25) == [0, 25, 50, 75]
    assert window_starts(100, 30) == [0, 30, 60, 70]
    x = torch.randn(2, 3, 100)
    w = all_windows(x, 30)
    assert w.shape == (4, 2, 3, 30) and torch.equal(w[3], x[..., 70:])
