"""Data kinds (`iared.data`: specs, `build_dataset`, the registry) and what every loader shares
(`iared.data.base`: errors, `carve_split`)."""

import numpy as np
import pytest

from iared.data import DATASETS, DataError, ImageError, build_dataset, carve_split, parse_data_spec, register_dataset


# ------------------------------------------------------------------------------- specs


def test_parse_data_spec():
    assert parse_data_spec("cluttered-digits") == ("cluttered-digits", None)
    assert parse_data_spec("cifar10:/a/b:c.zip") == ("cifar10", "/a/b:c.zip")
    assert parse_data_spec("CIFAR10:x") == ("cifar10", "x")
    for bad in ("", ":x", "cifar10:"):
        with pytest.raises(DataError):
            parse_data_spec(bad)


@pytest.mark.parametrize("spec,match", [
    ("nosuchkind", "unknown data kind"),
    ("mnist", "needs a path"),
    ("cifar10:/definitely/not/here", "does not exist"),
    ("imagefolder:/definitely/not/here", "not a directory"),
    ("cluttered-digits:/x", "takes no path"),
])
def test_build_dataset_errors_are_one_line(spec, match):
    with pytest.raises(DataError, match=match) as e:
        build_dataset(spec, "test")
    assert "\n" not in str(e.value)


def test_data_errors_are_user_errors():
    from iared.errors import UserError  # what the CLI turns into one line and exit code 2
    assert issubclass(DataError, UserError) and issubclass(ImageError, DataError)


def test_unknown_split_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="unknown split"):
        build_dataset("cluttered-digits", "training")
    with pytest.raises(DataError, match="no images"):
        build_dataset(f"imagefolder:{tmp_path}", "test")


def test_registry_is_extensible():
    def builder(path, split, seed, **kw):
        return [path, split, seed, kw]
    register_dataset("toy-kind", builder)
    try:
        assert build_dataset("toy-kind:p", "val", 3, a=1) == ["p", "val", 3, {"a": 1}]
    finally:
        DATASETS.pop("toy-kind")


def test_carve_split_partitions():
    tr, va = carve_split(100, "train", 0, 10), carve_split(100, "val", 0, 10)
    assert len(va) == 10 and len(tr) == 90
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(100))
    np.testing.assert_array_equal(va, carve_split(100, "val", 0, 10))
    assert not np.array_equal(va, carve_split(100, "val", 1, 10))
