"""Offline teacher cache: the teacher's outputs for a dataset split in sharded ArrayRecord files.

Write one (resumable: rerun the same command after a crash; finished shards are kept, the rest
are redone):

    python -m titans.teachers.cache --teacher_workdir=RUN --dataset=fashion_mnist \
        --split='train[:90%]' --out=CACHE_DIR [--topk=0] [--dtype=float32] [--shard_size=8192]
    python -m titans.teachers.cache --config=configs/teacher_modes_fmnist.py:mode=cache,seed=0

Layout of CACHE_DIR:
  manifest.json                       what the cache holds and for which teacher (below)
  shard-00000-of-00007.array_record   record i of shard s = example s * shard_size + i of the split
  shard-00003-of-00007.array_record.tmp   a shard being written; never read, removed on resume

A record is one example: its full logits (`topk=0`, `num_classes` values) or its top-k logits and
class indices (`topk=k`, k values then k int32 indices), little-endian, values in `dtype`.
Shards are written with `group_size:1`, so the trainer reads random examples without decoding
neighbours, and a shard only gets its final name once it is complete (atomic rename).

The manifest names the teacher by the SHA-256 of its variables (so a teacher copied elsewhere is
the same teacher and a retrained one is not), its run directory and step; the dataset, split,
number of examples, dtype and k. The trainer refuses a cache whose manifest differs from its own
run (`TeacherCache.check`), and one that is not complete.

Soft labels are computed on the un-augmented images (the evaluation transform): the cache is keyed
by example only, and a run that augments its training images refuses it (see
`titans.teachers.open_soft_labels`); `service` mode labels augmented images.

CACHE_DIR may be a bucket (`--out=gs://bucket/cache`, `distill.cache.dir=gs://...`). ArrayRecord's
C++ writer and reader take local file names, so there each shard is written to a local temporary file,
hashed, and uploaded whole under its final name (an object appears all at once: no `.tmp` objects);
the manifest is one upload too. A reader downloads the shards into a local copy,
`$XDG_CACHE_HOME/titans/teacher_cache/<SHA-256 of the URL>/` (default `~/.cache/...`), and checks
every shard against the manifest's SHA-256 before using it: a copy that already matches is reused,
any other is downloaded again, and a shard in the bucket that fails its checksum is a named error.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import os
import shlex
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from array_record.python import array_record_data_source, array_record_module
from flax import nnx

from titans import checkpoint as ckpt_lib
from titans import cli as cli_lib
from titans import config as config_lib
from titans import data as data_lib
from titans import locks, parallel, paths, runs
from titans.teachers.soft_labels import topk_to_logits

FORMAT = "titans-teacher-cache"
VERSION = 1
DTYPES = ("float32", "bfloat16", "float16")
# Fields that must match between a cache and the run (or the job) that uses it.
_JOB_FIELDS = ("dataset", "split", "num_examples", "num_classes", "dtype", "topk", "shard_size")


class CacheError(RuntimeError):
    """A teacher cache that cannot be used: missing, incomplete, or unreadable."""


class StaleCacheError(CacheError):
    """The cache was written for another teacher, dataset, split, size, dtype or k."""


def _np_dtype(name: str):
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def record_dtype(num_classes: int, topk: int, dtype: str) -> np.dtype:
    """The structured numpy dtype of one record (one example)."""
    v = _np_dtype(dtype).newbyteorder("<")
    if topk:
        return np.dtype([("values", v, (topk,)), ("indices", "<i4", (topk,))])
    return np.dtype([("logits", v, (num_classes,))])


def shard_name(s: int, num_shards: int) -> str:
    return f"shard-{s:05d}-of-{num_shards:05d}.array_record"


def local_copy_dir(url: str) -> str:
    """Where the shards of the cache at `url` (a bucket) are downloaded to be read:
    $XDG_CACHE_HOME/titans/teacher_cache/<SHA-256 of the URL> (default ~/.cache/titans/...)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "titans", "teacher_cache", hashlib.sha256(paths.text(url).encode()).hexdigest())


# ----------------------------------------------------------------------------- teacher identity


def variables_digest(teacher) -> str:
    """SHA-256 over a frozen model's variables (paths, dtypes, shapes, bytes), in a fixed order."""
    h = hashlib.sha256()
    for part, tree in (("params", teacher.params), ("rest", teacher.model_state)):
        flat = jax.tree_util.tree_flatten_with_path(ckpt_lib.to_savable(nnx.to_pure_dict(tree)))[0]
        for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
            arr = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
            h.update(f"{part}{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}|".encode())
            h.update(arr.tobytes())
    return h.hexdigest()


def load_teacher_with_identity(teacher_workdir: str, step: int, info, dtype=None):
    """(Teacher, teacher config, identity dict) of a teacher run, refusing one for other data."""
    workdir = paths.text(teacher_workdir)
    steps = runs.RunDir(workdir).checkpoint_steps()
    use = (steps[-1] if steps else step) if step < 0 else step
    teacher, t_cfg = runs.load_teacher(workdir, info, dtype=dtype or jnp.float32, step=use)
    identity = {
        "workdir": workdir,
        "step": int(use),
        "model": t_cfg.model.name,
        "variables_sha256": variables_digest(teacher),
    }
    return teacher, t_cfg, identity


def teacher_identity(teacher_workdir: str, step: int, info) -> dict:
    return load_teacher_with_identity(teacher_workdir, step, info)[2]


# ----------------------------------------------------------------------------------- reading


class TeacherCache:
    """A complete cache opened for random access: `logits(indices)`, `topk(indices)`."""

    def __init__(self, directory: str):
        self.directory = paths.text(directory) if directory else ""
        path = paths.join(self.directory, "manifest.json") if directory else ""
        text = paths.read_text(path) if directory else None
        if text is None:
            raise CacheError(
                f"No teacher cache at distill.cache.dir={directory!r} (no manifest.json). Write it first with "
                f"`python -m titans.teachers.cache --teacher_workdir=... --dataset=... --split=... --out={directory}` "
                f"(or --config=<this run's config>)."
            )
        self.manifest = json.loads(text)
        m = self.manifest
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise CacheError(
                f"{path} is not a Titans teacher cache of version {VERSION} "
                f"(format={m.get('format')!r}, version={m.get('version')!r})."
            )
        missing = [name for name in m["shards"] if not paths.exists(paths.join(self.directory, name))]
        if not m.get("complete") or missing:
            raise CacheError(
                f"The teacher cache in {self.directory} is incomplete ({len(missing)} of {m['num_shards']} shards "
                f"missing: the writing job was interrupted). Rerun its command to finish it (finished shards are "
                f"kept):\n  {m.get('command', 'python -m titans.teachers.cache ...')}"
            )
        self.num_classes, self.topk = int(m["num_classes"]), int(m["topk"])
        self.dtype = record_dtype(self.num_classes, self.topk, m["dtype"])
        self.shard_files = self._checked_local_shards()
        self._source = array_record_data_source.ArrayRecordDataSource(self.shard_files)
        if len(self._source) != int(m["num_examples"]):
            raise CacheError(
                f"The teacher cache in {self.directory} holds {len(self._source)} records, "
                f"its manifest says {m['num_examples']}: rewrite it."
            )

    def _checked_local_shards(self) -> list[str]:
        """The shards as local files, each checked against the manifest's SHA-256 (a swapped, foreign,
        truncated or altered shard is a named error, not wrong soft labels): the cache's own files, or
        for a cache in a bucket, copies in `local_copy_dir(directory)` (downloaded unless a matching
        copy is there already)."""
        recorded = self.manifest.get("shard_sha256")
        if recorded is None:
            logging.warning(
                "The teacher cache in %s records no shard checksums (written by an older Titans); "
                "its shards are read unverified.",
                self.directory,
            )
        names = self.manifest["shards"]
        if paths.is_remote(self.directory):
            local = local_copy_dir(self.directory)
            os.makedirs(local, exist_ok=True)
            return [self._download(name, os.path.join(local, name), recorded) for name in names]
        files = [os.path.join(self.directory, name) for name in names]
        if recorded is not None:
            for name, file in zip(names, files):
                self._check_shard(name, ckpt_lib.file_sha256(file), recorded)
        return files

    def _download(self, name: str, dest: str, recorded: dict | None) -> str:
        """Shard `name` of a cache in a bucket as the local file `dest`, verified (with `recorded`)."""
        if recorded is not None and os.path.exists(dest) and ckpt_lib.file_sha256(dest) == recorded.get(name):
            return dest  # downloaded before, and still this cache's shard
        tmp, h = f"{dest}.tmp{os.getpid()}", hashlib.sha256()
        try:
            with paths.resolve(paths.join(self.directory, name)).open("rb") as src, open(tmp, "wb") as out:
                for block in iter(lambda: src.read(1 << 20), b""):
                    h.update(block)
                    out.write(block)
            if recorded is not None:
                self._check_shard(name, h.hexdigest(), recorded)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return dest

    def _check_shard(self, name: str, got: str, recorded: dict) -> None:
        if got != recorded.get(name):
            raise CacheError(
                f"Shard {name} of the teacher cache in {self.directory} fails its checksum (SHA-256 {got[:12]}..., "
                f"manifest {str(recorded.get(name))[:12]}...): it was altered, truncated or swapped with "
                f"another cache's. Rewrite the cache into a fresh directory."
            )

    def __len__(self) -> int:
        return len(self._source)

    def describe(self) -> str:
        m = self.manifest
        what = f"top-{self.topk}" if self.topk else "full logits"
        return (
            f"{m['num_examples']} examples of {m['dataset']}/{m['split']}, {what} in {m['dtype']}, teacher "
            f"{m['teacher']['workdir']} step {m['teacher']['step']}"
        )

    def check(
        self,
        *,
        teacher: dict,
        dataset: str,
        split: str,
        num_examples: int,
        topk: int | None = None,
        dtype: str | None = None,
    ) -> None:
        """Raises StaleCacheError listing every field in which the cache differs from the run."""
        m = self.manifest
        diffs = []
        if m["teacher"]["variables_sha256"] != teacher["variables_sha256"]:
            diffs.append(
                f"teacher: cache from {m['teacher']['workdir']} step {m['teacher']['step']} "
                f"(variables sha256 {m['teacher']['variables_sha256'][:12]}), this run's teacher is "
                f"{teacher['workdir']} step {teacher['step']} (sha256 {teacher['variables_sha256'][:12]})"
            )
        for key, want in (
            ("dataset", dataset),
            ("split", split),
            ("num_examples", int(num_examples)),
            ("topk", topk),
            ("dtype", dtype),
        ):
            if want is not None and m[key] != want:
                diffs.append(f"{key}: cache has {m[key]!r}, this run has {want!r}")
        if diffs:
            raise StaleCacheError(
                f"The teacher cache in {self.directory} does not belong to this run:\n  "
                + "\n  ".join(diffs)
                + "\nWrite a cache for this run with `python -m titans.teachers.cache` into another directory, "
                "or point distill.cache.dir at the right one."
            )

    def records(self, indices) -> np.ndarray:
        keys = [int(i) for i in np.asarray(indices).reshape(-1)]
        return np.frombuffer(b"".join(self._source.__getitems__(keys)), dtype=self.dtype)

    def logits(self, indices) -> np.ndarray:
        """Dense float32 logits (len(indices), num_classes); top-k caches are expanded."""
        rec = self.records(indices)
        if self.topk:
            return topk_to_logits(rec["values"].astype(np.float32), rec["indices"], self.num_classes)
        return rec["logits"].astype(np.float32)

    def topk_entries(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(values float32 (n, k), class indices int32 (n, k)) of a top-k cache."""
        if not self.topk:
            raise CacheError(f"The cache in {self.directory} holds full logits, not top-k.")
        rec = self.records(indices)
        return rec["values"].astype(np.float32), rec["indices"].astype(np.int32)


# ----------------------------------------------------------------------------------- writing


def _write_json(path: str, obj) -> None:
    if paths.is_remote(path):  # one upload, which an object store makes visible all at once
        paths.write_text(path, json.dumps(obj, indent=2, sort_keys=True))
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _full_logits(teacher, images):
    return teacher.logits(images)


def _topk_logits(teacher, images, k):
    return jax.lax.top_k(teacher.logits(images), k)


def _topk_fn(topk: int):
    """The `runs.predict` function of a cache: full logits, or (top-k values, top-k classes)."""
    return functools.partial(_topk_logits, k=topk) if topk else _full_logits


def write_cache(*, out: str, **kwargs) -> dict:
    """Writes (or finishes) the cache; returns its manifest. See the module docstring. One writer at a
    time: a second job on the same `out` fails at once (titans.locks). `out` may be a bucket (gs://...)."""
    paths.makedirs(out)
    with locks.WorkdirLock(out, "teacher cache"):
        return _write_cache(out=out, **kwargs)


def _write_cache(
    *,
    teacher_workdir: str,
    dataset: str,
    split: str,
    out: str,
    data_dir: str | None = None,
    teacher_step: int = -1,
    topk: int = 0,
    dtype: str = "float32",
    shard_size: int = 8192,
    batch_size: int = 512,
    delay_per_shard_s: float = 0.0,
    command: str = "",
    log=print,
) -> dict:
    """Writes (or finishes) the cache in `out`, which the caller holds locked."""
    info = _checked_job_info(dataset, topk=topk, dtype=dtype, shard_size=shard_size, batch_size=batch_size)
    src = data_lib.get_source(dataset, split, data_dir=data_dir or None)
    teacher, _, identity = load_teacher_with_identity(teacher_workdir, teacher_step, info)
    n = len(src)
    manifest = _new_manifest(
        identity, dataset, split, n, info, dtype=dtype, topk=topk, shard_size=shard_size, command=command
    )
    num_shards = manifest["num_shards"]
    paths.makedirs(out)
    mpath = paths.join(out, "manifest.json")
    if paths.exists(mpath):
        old = _read_own_manifest(mpath, out, manifest)
        if old.get("complete"):
            log(f"[cache] {out} is already complete ({n} examples, {num_shards} shards); nothing to do.")
            return old
    else:
        _write_json(mpath, manifest)
    done = _finished_shards(out, num_shards, log)

    shards = _ShardWriter(src, info, teacher, topk=topk, dtype=dtype, batch_size=batch_size)
    t0 = time.perf_counter()
    written, digests = 0, {}
    for s in range(num_shards):
        if s in done:
            continue
        name = shard_name(s, num_shards)
        count, digests[name] = shards.write(paths.join(out, name), s * shard_size, min(n, (s + 1) * shard_size))
        written += count
        log(f"[cache] shard {s + 1}/{num_shards} written ({written} examples in {time.perf_counter() - t0:.1f} s)")
        if delay_per_shard_s:
            time.sleep(delay_per_shard_s)
    manifest["complete"] = True
    manifest["seconds"] = round(time.perf_counter() - t0, 3)
    manifest["shard_sha256"] = {  # shards kept from an earlier job are hashed where they lie
        name: digests.get(name) or ckpt_lib.file_sha256(paths.join(out, name)) for name in manifest["shards"]
    }
    _write_json(mpath, manifest)
    log(f"[cache] complete: {n} examples of {dataset}/{split} in {out}")
    return manifest


def _checked_job_info(dataset: str, *, topk: int, dtype: str, shard_size: int, batch_size: int):
    """Refuses a bad dtype, size or k (ValueError) before anything is loaded; returns the dataset's info."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype!r} is not one of {list(DTYPES)}.")
    if shard_size < 1 or batch_size < 1 or topk < 0:
        raise ValueError("shard_size and batch_size must be positive and topk >= 0.")
    info = data_lib.dataset_info(dataset)
    if topk >= info.num_classes:
        raise ValueError(
            f"--topk={topk} is not below the {info.num_classes} classes of {dataset}; use --topk=0 for full logits."
        )
    return info


def _new_manifest(
    identity: dict, dataset: str, split: str, n: int, info, *, dtype: str, topk: int, shard_size: int, command: str
) -> dict:
    """The manifest of a cache being written (`complete` False until its last shard is in place)."""
    num_shards = max(1, -(-n // shard_size))
    return {
        "format": FORMAT,
        "version": VERSION,
        "teacher": identity,
        "dataset": dataset,
        "split": split,
        "num_examples": n,
        "num_classes": int(info.num_classes),
        "dtype": dtype,
        "topk": int(topk),
        "shard_size": int(shard_size),
        "num_shards": num_shards,
        "shards": [shard_name(s, num_shards) for s in range(num_shards)],
        "record": ("topk values then int32 class indices" if topk else "logits") + f", little-endian {dtype}",
        "augmentation": "none (evaluation transform); keyed by example index",
        "command": command,
        "complete": False,
    }


def _read_own_manifest(mpath: str, out: str, manifest: dict) -> dict:
    """The manifest already in `out`, which must be of this job (same fields and teacher): else StaleCacheError."""
    old = json.loads(paths.read_text(mpath))
    identity = manifest["teacher"]
    diffs = [
        f"{k}: directory has {old.get(k)!r}, this job {manifest[k]!r}" for k in _JOB_FIELDS if old.get(k) != manifest[k]
    ]
    if old.get("teacher", {}).get("variables_sha256") != identity["variables_sha256"]:
        diffs.append(f"teacher: directory has {old.get('teacher')}, this job {identity}")
    if diffs:
        raise StaleCacheError(
            f"{out} already holds a cache of another job:\n  "
            + "\n  ".join(diffs)
            + "\nUse another --out, or delete that directory first."
        )
    return old


def _finished_shards(out: str, num_shards: int, log) -> list[int]:
    """Removes the leftovers of a killed writer (*.tmp) and returns the shards already complete in `out`."""
    root = paths.resolve(out)
    for stale in root.glob("*.tmp"):
        stale.unlink()  # a shard (or manifest) whose writer was killed before it finished (local caches only)
    done = [s for s in range(num_shards) if (root / shard_name(s, num_shards)).exists()]
    if done:
        log(f"[cache] resuming: kept {len(done)} finished shard(s) {done}, writing {num_shards - len(done)}.")
    return done


class _ShardWriter:
    """Writes the shards of one cache job: the teacher's outputs for a range of the split's examples."""

    def __init__(self, src, info, teacher, *, topk: int, dtype: str, batch_size: int):
        self.src, self.info, self.teacher = src, info, teacher
        self.topk, self.batch_size = topk, batch_size
        self.rec_dtype = record_dtype(info.num_classes, topk, dtype)
        self.store = _np_dtype(dtype)
        self.fn, self.mesh = _topk_fn(topk), parallel.make_mesh()

    def write(self, final: str, start: int, stop: int) -> tuple[int, str]:
        """Writes examples [start, stop) to `final`; returns (their number, the shard's SHA-256).

        Local: written as `final`.tmp, renamed once complete. In a bucket: written to a local temporary
        file (the ArrayRecord writer takes local names), hashed, then uploaded whole as `final`."""
        remote = paths.is_remote(final)
        with tempfile.TemporaryDirectory(prefix="titans-shard-") if remote else contextlib.nullcontext() as staging:
            tmp = os.path.join(staging, "shard.array_record") if remote else final + ".tmp"
            writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
            written = 0
            # Text: 16 batches at a time, which `runs.predict` runs sorted by length at their buckets.
            step = self.batch_size * (16 if self.info.modality == "text" else 1)
            for lo in range(start, stop, step):
                rows = self.records(lo, min(lo + step, stop))
                for r in range(len(rows)):
                    writer.write(rows[r : r + 1].tobytes())
                written += len(rows)
            writer.close()
            digest = ckpt_lib.file_sha256(tmp)
            if remote:
                with open(tmp, "rb") as f:
                    paths.write_bytes(final, f.read())
            else:
                os.replace(tmp, final)
        return written, digest

    def records(self, start: int, stop: int) -> np.ndarray:
        """The records of examples [start, stop): full logits, or top-k values and classes, in the storage dtype."""
        images, _ = data_lib.eval_images(self.src.__getitems__(range(start, stop)), self.info)
        out_arrays = runs.predict(self.fn, self.teacher, images, batch_size=self.batch_size, mesh=self.mesh)
        rows = np.zeros((stop - start,), self.rec_dtype)
        if self.topk:
            rows["values"] = out_arrays[0].astype(self.store)
            rows["indices"] = out_arrays[1].astype(np.int32)
        else:
            rows["logits"] = out_arrays.astype(self.store)
        return rows


def _parse(argv):
    p = cli_lib.parser(
        "titans-cache",
        "Write a teacher's outputs for a dataset split to a sharded ArrayRecord cache (resumable: rerun the same "
        "command).",
    )
    p.add_argument(
        "--config",
        default="",
        help="a student run config (FILE.py[:ARG]) to take the teacher, "
        "dataset, split, data_dir and distill.cache.{dir,topk,dtype} from; flags override it",
    )
    p.add_argument("--teacher_workdir", default=None)
    p.add_argument("--teacher_step", type=int, default=None, help="-1 = latest checkpoint")
    p.add_argument("--dataset", default=None)
    p.add_argument("--split", default=None, help="TFDS split, e.g. 'train[:90%%]'")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--out", default=None, help="the cache directory")
    p.add_argument("--topk", type=int, default=None, help="0 = full logits (default), k = top-k values+indices")
    p.add_argument("--dtype", default=None, choices=DTYPES)
    p.add_argument("--shard_size", type=int, default=8192, help="examples per shard (the unit of resumption)")
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--delay_per_shard_s", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: be killable
    args = p.parse_args(argv)
    defaults = dict(
        teacher_workdir="", teacher_step=-1, dataset="", split="train", data_dir="", out="", topk=0, dtype="float32"
    )
    if args.config:
        c = config_lib.validate(config_lib.load_config_file(args.config))
        defaults.update(
            teacher_workdir=c.distill.teacher_workdir,
            teacher_step=c.distill.teacher_step,
            dataset=c.dataset.name,
            split=c.dataset.train_split,
            data_dir=c.dataset.data_dir,
            out=c.distill.cache.dir,
            topk=c.distill.cache.topk,
            dtype=c.distill.cache.dtype,
        )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("teacher_workdir", "dataset", "out"):
        if not getattr(args, key):
            p.error(f"--{key} is required (or give --config with it set)")
    return args


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    command = "python -m titans.teachers.cache " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    write_cache(
        teacher_workdir=args.teacher_workdir,
        dataset=args.dataset,
        split=args.split,
        out=args.out,
        data_dir=args.data_dir,
        teacher_step=args.teacher_step,
        topk=args.topk,
        dtype=args.dtype,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        delay_per_shard_s=args.delay_per_shard_s,
        command=command,
        log=lambda s: print(s, flush=True),
    )
    return 0


def cli():
    sys.exit(main())


if __name__ == "__main__":
    cli()
