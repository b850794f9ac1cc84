"""Read what wandb wrote to an offline run's ``run-<id>.wandb`` file (no network, no wandb server).

The file is wandb's record log: a 7-byte header (":W&B", magic, version), then LevelDB-style
32 KiB blocks of chunks (crc32c, length, type: full / first / middle / last), each record a
``wandb_internal_pb2.Record`` protobuf.
"""
import glob
import json
import os

BLOCK, HEADER = 32768, 7


def records(path):
    from wandb.proto import wandb_internal_pb2 as pb
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, parts, out = HEADER, b"", []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:                     # the block's tail is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0:
            break
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            out.append(record)
    return out


def offline_runs(save_dir):
    """{run folder: (run id, [{"_step": n, metric: value, ...}, ...])} of every offline run under save_dir/wandb."""
    runs = {}
    for folder in sorted(glob.glob(os.path.join(str(save_dir), "wandb", "offline-run-*"))):
        run_id, history = None, []
        for r in records(glob.glob(os.path.join(folder, "run-*.wandb"))[0]):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run_id = r.run.run_id
            elif kind == "history":
                row = {"_step": r.history.step.num}
                row.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
                history.append(row)
        runs[os.path.basename(folder)] = (run_id, history)
    return runs
