"""Result files are written whole or not at all (`iared.fileio`)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from iared.fileio import atomic_write, check_writable, write_json


def test_write_json_turns_tensors_arrays_and_paths_into_json(tmp_path):
    path = write_json(tmp_path / "sub" / "r.json", {"t": torch.tensor([1.5, 2.0]), "a": np.arange(3),
                                                     "s": np.float32(0.25), "p": Path("/x/y")})
    assert json.loads(path.read_text()) == {"t": [1.5, 2.0], "a": [0, 1, 2], "s": 0.25, "p": "/x/y"}
    assert path.read_text().endswith("}\n")


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_json(tmp_path / "r.json", {"old": 1})

    class Exploding:
        def tolist(self):
            raise RuntimeError("cannot serialise")

    with pytest.raises(RuntimeError):
        write_json(path, {"new": Exploding()})
    assert json.loads(path.read_text()) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_results_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_writing_onto_a_folder_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError):
        atomic_write(tmp_path, b"x")
    with pytest.raises(IsADirectoryError):
        check_writable(tmp_path, is_file=True)


def test_check_writable_creates_the_folder_and_leaves_nothing_in_it(tmp_path):
    folder = tmp_path / "a" / "b"
    assert check_writable(folder) == folder
    assert folder.is_dir() and not any(folder.iterdir())
    check_writable(tmp_path / "c" / "out.json", is_file=True)
    assert (tmp_path / "c").is_dir() and not (tmp_path / "c" / "out.json").exists()
