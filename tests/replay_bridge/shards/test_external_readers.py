"""A dataset's shards open with pyarrow.dataset and Polars straight from its URI (a local
directory or an S3 prefix: nothing but shards at the top level, the manifests, indexes and
quarantine under ``_routing_replay/``, which pyarrow skips), and with DuckDB and Hugging Face
datasets locally, in a fresh interpreter in which importing this package is blocked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from replay_bridge.checks import CheckReport
from replay_bridge.shards import ShardWriter
from tests.support.processes import child_env

from .conftest import make_sample
from .helpers import SHARD_RE, is_local, object_names

SCRIPT = r"""
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "replay_bridge":
            raise ImportError("replay_bridge must not be needed")
sys.meta_path.insert(0, Block())

expect = json.load(open(sys.argv[1]))
out = {}
for d, want in expect.items():
    res = out[d] = {}
    remote = d.startswith("s3://")

    import pyarrow.dataset as ds
    dset = ds.dataset(d, format="arrow")  # the dataset's URI itself, no file list
    files = sorted(dset.files)
    res["files"] = [f.rsplit("/", 1)[-1] for f in files]
    t = dset.to_table()
    meta = json.loads(dset.schema.metadata[b"routing_replay"])
    res["pyarrow"] = {
        "rows": t.num_rows, "type": str(t.schema.field("routed").type),
        "routed": t.filter(ds.field("sample_id") == want["id"]).column("routed")[0].as_py(),
        "top_k": meta["top_k"], "moe_layers": meta["moe_layers"],
    }

    import polars as pl
    top = f"{d}/*.arrow"  # everything at the top level is a shard
    df = pl.scan_ipc(top).filter(pl.col("sample_id") == want["id"]).collect()
    full = pl.read_ipc(("s3://" if remote else "") + files[0])
    res["polars"] = {"rows": pl.scan_ipc(top).select(pl.len()).collect().item(),
                     "type": str(full.schema["routed"]), "routed": df["routed"][0].to_list(),
                     "logprobs_null": full["logprobs"].null_count()}
    if remote:  # DuckDB and datasets would need network extensions for S3
        continue

    import duckdb
    con = duckdb.connect()
    rows = con.execute("select count(*) from dset").fetchone()[0]
    routed = con.execute("select routed from dset where sample_id = ?", [want["id"]]).fetchone()[0]
    tokens = con.execute("select sum(len(tokens)) from dset").fetchone()[0]
    res["duckdb"] = {"rows": rows, "routed": list(routed), "tokens": int(tokens)}

    import datasets
    datasets.disable_progress_bars()
    hf = datasets.load_dataset("arrow", data_files=f"{d}/*.arrow", split="train",
                               cache_dir=sys.argv[2])
    row = hf.filter(lambda r: r["sample_id"] == want["id"])[0]
    res["datasets"] = {"rows": hf.num_rows, "type": str(hf.features["routed"]),
                       "routed": row["routed"]}
out["imported"] = sorted(m for m in sys.modules if m.startswith("replay_bridge"))
print(json.dumps(out))
"""


@pytest.mark.parametrize("wide", [False, True], ids=["uint8", "uint16"])
def test_external_readers(dataset_uri, tmp_path, tiny, wide):
    from replay_bridge.geometry import RoutingGeometry

    g = RoutingGeometry(3, (1, 2), 2, 300) if wide else tiny
    samples = [make_sample(g, f"s{i}", 12 + i, seed=i, logprobs=i % 2 == 0) for i in range(7)]
    if wide:
        samples[5].routed[..., 0] = 299
    expect = {}
    for comp in ("zstd", "lz4", "none"):
        uri = f"{dataset_uri}-{comp}"
        for writer, part in (("a", samples[:4]), ("b", samples[4:])):  # two writers
            with ShardWriter(uri, g, samples_per_shard=3, compression=comp, writer_id=writer,
                             resume=True) as w:
                for s in part:
                    w.add(s)
                w.quarantine(CheckReport(f"bad-{writer}", kinds=("all_zero",), message="z"))
        top = [n for n in object_names(uri) if "/" not in n]
        assert top and all(SHARD_RE.fullmatch(n) for n in top), top
        expect[uri] = {"id": "s5", "shards": top}
    (tmp_path / "expect.json").write_text(json.dumps(expect))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "expect.json"),
                           str(tmp_path / "hf-cache")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=240, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("imported") == []
    want_routed = samples[5].routed.reshape(-1).tolist()
    id_type = "uint16" if wide else "uint8"
    readers = ("pyarrow", "polars", "duckdb", "datasets") if is_local(dataset_uri) else (
        "pyarrow", "polars")
    for d, res in out.items():
        assert res["files"] == expect[d]["shards"]  # pyarrow read the shards and nothing else
        for reader in readers:
            assert res[reader]["rows"] == 7, (d, reader)
            assert res[reader]["routed"] == want_routed, (d, reader)
        assert res["pyarrow"]["type"] == f"list<item: {id_type}>"
        assert res["pyarrow"]["top_k"] == 2 and res["pyarrow"]["moe_layers"] == list(g.moe_layers)
        assert res["polars"]["type"] == f"List({id_type.capitalize().replace('Ui', 'UI')})"
        assert res["polars"]["logprobs_null"] == 1  # s1 in the first shard has none
        if is_local(dataset_uri):
            assert res["duckdb"]["tokens"] == sum(s.num_tokens for s in samples)
            assert id_type in res["datasets"]["type"]
