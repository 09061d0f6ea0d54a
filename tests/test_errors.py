"""DeoError: one line, also when PyTorch re-raises it from a DataLoader worker."""

import pytest
import torch

from deo_cli.errors import BandError, DeoError, UsageError


class Failing(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise BandError("scene x.tif lacks band(s) B05", "pass --band-names")


def test_one_line_with_problem_and_fix():
    assert DeoError("no data. ", "add some").one_line() == "no data. Add some."
    assert UsageError("bad").exit_code == 2


def test_an_error_from_a_dataloader_worker_keeps_its_type_and_its_one_line():
    loader = torch.utils.data.DataLoader(Failing(), num_workers=1)
    with pytest.raises(BandError) as info:
        next(iter(loader))
    err = info.value
    assert err.one_line() == "scene x.tif lacks band(s) B05. Pass --band-names."
    assert "Traceback" not in str(err) and "worker" not in str(err)
    notes = getattr(err, "__notes__", None)
    assert notes is None or "DataLoader worker process 0" in notes[0]  # -v still shows where
