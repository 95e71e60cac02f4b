import torch

from beit3.layers import window_merge, window_partition


def test_window_partition_round_trip_with_padding():
    x = torch.randn(2, 5, 7, 4)
    windows, grid = window_partition(x, 3)
    assert windows.shape == (2 * 2 * 3, 9, 4) and grid == (2, 3)
    torch.testing.assert_close(window_merge(windows, grid, 3, (5, 7)), x)


def test_windows_hold_the_patches_they_cover_and_zero_padding():
    x = torch.arange(2 * 3 * 1, dtype=torch.float32).view(1, 2, 3, 1) + 1  # a 2x3 grid holding 1..6
    windows, grid = window_partition(x, 2)
    assert grid == (1, 2)
    assert windows[0, :, 0].tolist() == [1, 2, 4, 5]  # rows 0-1, cols 0-1, raster order
    assert windows[1, :, 0].tolist() == [3, 0, 6, 0]  # col 2, then the padded col 3
