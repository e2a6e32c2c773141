"""The synthetic shapes dataset."""

from retinanet_xla.data.synthetic import write_synthetic_dataset


def test_synthetic_dataset_is_deterministic(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", 6, 2, seed=3)
    b = write_synthetic_dataset(tmp_path / "b", 6, 2, seed=3)
    assert a["train"]["annotations"].read_text() == b["train"]["annotations"].read_text()
    assert (a["train"]["images"] / "000001.jpg").read_bytes() == (b["train"]["images"] / "000001.jpg").read_bytes()
