"""The zarr run store: chunked appends, NaN fill, dimension names, readers during writes."""

import numpy as np
import pytest
import torch

from lscape.errors import UsageError
from lscape.options import Output
from lscape.store import RunReader, RunStore


def make(tmp_path):
    return RunStore.create(tmp_path / "r.zarr", {"lscape_version": "test", "status": "running"})


def test_rows_append_with_declared_dims_and_nan_fill(tmp_path):
    store = make(tmp_path)
    w = store.group("probe", [Output("top", dims=("k",), units="1", long_name="top eigenvalues")])
    w.append(0, top=torch.tensor([3.0, 2.0]), scalar=1.5)
    w.append(5, top=np.array([4.0, 1.0]))
    store.flush()
    d = RunReader(tmp_path / "r.zarr").read("probe")
    assert d["step"].tolist() == [0, 5]
    np.testing.assert_array_equal(d["top"], [[3, 2], [4, 1]])
    assert d["scalar"][0] == 1.5 and np.isnan(d["scalar"][1])
    arr = store.root["probe/top"]
    assert arr.metadata.dimension_names == ("step", "k")
    assert arr.attrs["long_name"] == "top eigenvalues"


def test_xarray_opens_groups_with_step_coordinate(tmp_path):
    xr = pytest.importorskip("xarray")
    store = make(tmp_path)
    w = store.group("g", [Output("v", dims=("k",))])
    for s in range(3):
        w.append(s * 10, v=np.arange(4.0) + s, loss=float(s))
    store.flush()
    ds = xr.open_zarr(tmp_path / "r.zarr", group="g", consolidated=False)
    assert list(ds["step"].values) == [0, 10, 20]
    assert ds["v"].dims == ("step", "k")
    assert float(ds["loss"].sel(step=20)) == 2.0


def test_reader_sees_flushed_rows_while_writer_buffers(tmp_path):
    store = make(tmp_path)
    w = store.group("g")
    w.flush_seconds = 1e9
    w.append(0, x=1.0)
    w.flush()
    w.append(1, x=2.0)  # buffered, not yet written
    reader = RunReader(tmp_path / "r.zarr")
    assert reader.read("g")["x"].tolist() == [1.0]
    w.flush()
    assert RunReader(tmp_path / "r.zarr").read("g")["x"].tolist() == [1.0, 2.0]


def test_flush_happens_per_chunk(tmp_path):
    store = make(tmp_path)
    w = store.group("g")
    w.flush_seconds = 1e9
    big = np.zeros(2**18)  # 2 MiB rows: one row per chunk
    w.append(0, traj=big)
    assert RunReader(tmp_path / "r.zarr").read("g")["traj"].shape == (1, 2**18)


def test_long_vectors_are_chunked_along_their_length(tmp_path):
    store = make(tmp_path)
    w = store.group("g")
    w.append(0, traj=np.zeros(10**6, dtype=np.float32))
    w.flush()
    chunks = store.root["g/traj"].chunks
    assert chunks[1] < 10**6


def test_truncate_drops_later_rows(tmp_path):
    store = make(tmp_path)
    w = store.group("g")
    for s in range(5):
        w.append(s, x=float(s))
    w.truncate(2)
    w.append(2, x=20.0)
    w.flush()
    assert RunReader(tmp_path / "r.zarr").read("g")["x"].tolist() == [0.0, 1.0, 20.0]


def test_existing_store_is_not_overwritten(tmp_path):
    make(tmp_path)
    with pytest.raises(UsageError, match="already exists"):
        make(tmp_path)


def test_reader_rejects_missing_and_foreign_stores(tmp_path):
    with pytest.raises(UsageError, match="no run store"):
        RunReader(tmp_path / "nope.zarr")
    import zarr

    zarr.open_group(tmp_path / "other.zarr", mode="w")
    with pytest.raises(UsageError, match="not a lscape run"):
        RunReader(tmp_path / "other.zarr")


def test_array_missing_from_later_flushes_keeps_steps_length(tmp_path):
    store = make(tmp_path)
    w = store.group("g")
    w.append(0, loss=1.0)
    w.append(1, loss=2.0, eval_loss=5.0)
    w.flush()
    w.append(2, loss=3.0)
    w.flush()
    d = RunReader(tmp_path / "r.zarr").read("g")
    assert d["eval_loss"].shape == (3,) and d["eval_loss"][1] == 5.0 and np.isnan(d["eval_loss"][[0, 2]]).all()


def test_url_stores_work_for_out_show_and_resume(cli, tmp_path):
    pytest.importorskip("fsspec")
    import lscape

    url = "memory://lscape-test-run"
    res = lscape.run(data="synthetic", data_opts={"n": 64, "dim": 4, "classes": 2}, batch_size=16, steps=4,
                     checkpoint_schedule="every:2", progress=False, out=url)
    assert res.status == "completed" and res.path == url
    assert RunReader(url).read("train")["step"].tolist() == [0, 1, 2, 3]
    code, out, _ = cli("show", url, "--json")
    assert code == 0 and '"completed"' in out
    code, _, err = cli("run", "--steps", "2", "--out", url)
    assert code == 2 and "already exists" in err
    assert lscape.run(resume=url, progress=False).status == "completed"
    assert not any(tmp_path.iterdir())  # nothing was written to the local disk


def test_rows_resized_but_not_written_by_a_killed_writer_are_ignored(tmp_path):
    """A SIGKILL between resizing `step` and writing it leaves fill values (-1): readers stop
    there, and the next writer (a resumed run) writes over them."""
    store = make(tmp_path)
    w = store.group("g")
    for s in range(3):
        w.append(s, x=float(s))
    w.flush()
    store.root["g/step"].resize((5,))  # what a killed flush can leave behind
    store.root["g/x"].resize((5,))
    assert RunReader(tmp_path / "r.zarr").read("g")["step"].tolist() == [0, 1, 2]
    store.lock.release()  # the killed writer's lock went with its process
    again = RunStore.open(tmp_path / "r.zarr").group("g")
    again.append(3, x=3.0)
    again.flush()
    d = RunReader(tmp_path / "r.zarr").read("g")
    assert d["step"].tolist() == [0, 1, 2, 3] and d["x"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert store.root["g/step"].shape == (4,)


def test_rows_beyond_the_published_count_are_not_read(tmp_path):
    """A writer killed after growing and filling its arrays but before publishing the row
    count: readers (and the next writer) keep to the published count."""
    store = make(tmp_path)
    w = store.group("g", [Output("v", dims=("k",))])
    for s in range(3):
        w.append(s, x=float(s), v=np.full(2, float(s)))
    w.flush()
    assert store.root["g"].attrs["rows"] == 3
    for name, value in (("step", 3), ("x", 3.0), ("v", np.full(2, 3.0))):  # a 4th row, unpublished
        arr = store.root[f"g/{name}"]
        arr.resize((4,) + arr.shape[1:])
        arr[3] = value
    reader = RunReader(tmp_path / "r.zarr")
    assert reader.read("g")["step"].tolist() == [0, 1, 2]
    assert reader.to_xarray("g").sizes["step"] == 3 if _has_xarray() else True
    store.lock.release()
    again = RunStore.open(tmp_path / "r.zarr").group("g")
    assert len(again) == 3
    again.append(3, x=30.0, v=np.zeros(2))
    again.flush()
    assert RunReader(tmp_path / "r.zarr").read("g")["x"].tolist() == [0.0, 1.0, 2.0, 30.0]


def test_to_xarray_gives_labelled_arrays_cut_to_the_committed_rows(tmp_path):
    xr = pytest.importorskip("xarray")
    store = make(tmp_path)
    w = store.group("g", [Output("v", dims=("k",), units="1", long_name="a vector")], attrs={"plugin": "p"})
    for s in range(4):
        w.append(10 * s, v=np.arange(3.0) * s, loss=float(s))
    w.flush()
    ds = RunReader(tmp_path / "r.zarr").to_xarray("g")
    assert isinstance(ds, xr.Dataset) and list(ds["step"].values) == [0, 10, 20, 30]
    assert ds["v"].dims == ("step", "k") and ds["v"].attrs["long_name"] == "a vector"
    assert float(ds["loss"].sel(step=20)) == 2.0 and ds.attrs["plugin"] == "p" and "rows" not in ds.attrs
    with pytest.raises(UsageError, match="has no group 'nope'"):
        RunReader(tmp_path / "r.zarr").to_xarray("nope")


def test_reader_says_who_writes_the_store(tmp_path):
    import os

    store = make(tmp_path)
    info = RunReader(tmp_path / "r.zarr").writer()
    assert info["pid"] == os.getpid() and info["alive"] is True and info["released"] is False
    store.close()
    assert RunReader(tmp_path / "r.zarr").writer()["alive"] is False
    assert "lock" not in RunReader(tmp_path / "r.zarr").groups()  # the lock group holds no arrays


def _has_xarray() -> bool:
    try:
        import xarray  # noqa: F401
    except ImportError:
        return False
    return True
