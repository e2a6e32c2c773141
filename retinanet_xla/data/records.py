"""A dataset as a few large record shards: ``PREFIX.json`` and ``PREFIX-00000-of-0000N.rxr``.

118k small JPEGs opened one by one from a bucket or NFS are what TPU users learn to avoid; a
few large objects copy, check and version as one dataset. The format is ours and small:

- each shard is ``MAGIC`` followed by the images' encoded bytes exactly as stored (never
  re-encoded), back to back;
- ``PREFIX.json`` is a COCO instances file (so pycocotools evaluates against it as it is) whose
  images each carry ``record: {shard, offset, length, crc32}``, plus a ``records`` section
  (format, version, source, counts, shard names and sizes). Its annotations are the source's,
  unchanged, for the images kept: loading applies the same validation, so the records give
  the same boxes, bit for bit, as the COCO files they came from.

Random access by byte range, rather than a sequential stream (TFRecord), is what keeps the
exact, resumable sampling (``TrainSampler``): any sample is one ranged read, locally or from a
bucket (``storage.ByteRange``), and a replica reads only its own samples. (array_record also
gives random access, but its reader opens local files only, and it brings absl and etils.)
"""

import json
import zlib
from typing import Dict, List

from retinanet_xla import storage
from retinanet_xla.data.coco import CocoDataset, load_coco, read_annotations
from retinanet_xla.errors import DatasetError, shown
from retinanet_xla.storage import ByteRange, Location

MAGIC = b"RXREC1\n"
FORMAT = "retinanet-xla-records"
VERSION = 1
READ_AT_ONCE = 64  # images held in memory while a shard is written


def shard_name(prefix: Location, index: int, count: int) -> Location:
    return storage.location(f"{prefix}-{index:05d}-of-{count:05d}.rxr")


def write_records(annotations: Location, images: Location, prefix: Location, shards: int = 1) -> CocoDataset:
    """Validate ``annotations`` as ``data check`` does (problems are counted on the returned
    dataset and those entries left out), then write the shards and ``PREFIX.json``."""
    if shards < 1:
        raise DatasetError(f"--shards {shards}: expected at least 1")
    annotations = storage.location(annotations)
    source = read_annotations(annotations)
    coco = load_coco(annotations, images, data=source)  # the file is read once
    records = coco.records
    kept = {record.image_id for record in records}
    by_id = {entry["id"]: entry for entry in source["images"]}
    images_out: List[Dict] = []
    shard_info = []
    bounds = [round(k * len(records) / shards) for k in range(shards + 1)]
    for index in range(shards):
        name = shard_name(prefix, index, shards)
        placed = []  # (record, offset, length, crc32)

        def write(handle, chunk=records[bounds[index] : bounds[index + 1]], placed=placed) -> None:
            # A few images at a time: a shard of COCO train is gigabytes.
            offset = handle.write(MAGIC)
            for first in range(0, len(chunk), READ_AT_ONCE):
                group = chunk[first : first + READ_AT_ONCE]
                for record, data in zip(group, storage.read_many([record.path for record in group])):
                    if isinstance(data, Exception):
                        raise DatasetError(f"{record.path}: cannot be read ({data})")
                    placed.append((record, offset, len(data), zlib.crc32(data)))
                    offset += handle.write(data)

        storage.write_file(name, write)
        for record, start, length, crc in placed:
            entry = dict(by_id[record.image_id])
            entry["record"] = {"shard": storage.name(name), "offset": start, "length": length, "crc32": crc}
            images_out.append(entry)
        shard_info.append({"name": storage.name(name), "records": len(placed), "bytes": len(MAGIC) + sum(p[2] for p in placed)})
    meta = {
        "images": images_out,
        "annotations": [a for a in source["annotations"] if isinstance(a, dict) and a.get("image_id") in kept],
        "categories": source["categories"],
        "records": {
            "format": FORMAT,
            "version": VERSION,
            "source": str(annotations),
            "images": len(images_out),
            "boxes": sum(len(record.boxes) for record in records),
            "shards": shard_info,
        },
    }
    storage.write_text(storage.location(f"{prefix}.json"), json.dumps(meta))
    return coco


def load_records(prefix: Location, label_mapping: str = "contiguous", min_box_size: float = 1.0) -> CocoDataset:
    """The dataset of ``PREFIX.json``, each image's path a byte range of its shard. A shard that
    is missing or shorter than its index says is a ``DatasetError`` naming it, at start."""
    meta_path = storage.location(f"{prefix}.json")
    meta = read_annotations(
        meta_path, "records index does not exist (write it with 'retinanet-xla data convert ANN --from coco')"
    )
    info = meta.get("records") if isinstance(meta, dict) else None
    if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("version") != VERSION:
        raise DatasetError(f"{meta_path}: not a {FORMAT} index of version {VERSION}")
    directory = storage.parent(meta_path)
    shards = {}
    for entry in info.get("shards") if isinstance(info.get("shards"), list) else []:
        name = entry.get("name") if isinstance(entry, dict) else None
        # A shard is a file beside its index (data convert writes it there): a name with a
        # folder in it, ../ above all, is never read.
        plain = isinstance(name, str) and name not in ("", ".", "..") and not set(name) & set("/\\\0")
        if not plain:
            raise DatasetError(f"{meta_path}: shard name {shown(name)} is not a file name in the index's folder")
        shards[name] = storage.join(directory, name)
    needed: Dict[str, int] = {}
    slices = {}
    for image in meta["images"] if isinstance(meta.get("images"), list) else []:
        record = image.get("record") if isinstance(image, dict) else None
        if not isinstance(record, dict) or not isinstance(record.get("shard"), str) or record["shard"] not in shards:
            raise DatasetError(
                f"{meta_path}: image {shown(image.get('id') if isinstance(image, dict) else image)} has no record in a listed shard"
            )
        fields = [record.get(key) for key in ("offset", "length", "crc32")]
        if not all(isinstance(value, int) and not isinstance(value, bool) and value >= 0 for value in fields):
            raise DatasetError(
                f"{meta_path}: image {shown(image.get('id'))}: record offset, length and crc32 must be non-negative integers, "
                f"got {shown(fields)}"
            )
        end = record["offset"] + record["length"]
        needed[record["shard"]] = max(needed.get(record["shard"], 0), end)
        if isinstance(image.get("id"), int):  # any other id is one load_coco names and leaves out
            slices[image["id"]] = ByteRange(shards[record["shard"]], record["offset"], record["length"], record["crc32"])
    for name, end in needed.items():
        size = storage.size(shards[name]) if storage.is_file(shards[name]) else None
        if size is None:
            raise DatasetError(f"{shards[name]}: record shard does not exist")
        if size < end:
            raise DatasetError(f"{shards[name]}: record shard is truncated ({size} bytes; its index needs {end})")
    coco = load_coco(meta_path, directory, label_mapping, min_box_size, check_files=False, data=meta)
    for record in coco.records:
        record.path = slices[record.image_id]
    return coco
