"""Measures TrainLoader throughput:  python -m titans.data.throughput fashion_mnist --batch=128

Prints examples/s over a number of steps after a short warm-up (preparing the dataset first
if it is one that Titans prepares itself).
"""

from __future__ import annotations

import time

from titans import cli, data


def measure(
    name: str,
    batch: int,
    steps: int,
    data_dir=None,
    prefetch: int = 2,
    threads: int = 1,
    augment: bool = True,
    split: str = "train",
    in_memory: bool = False,
) -> float:
    info = data.dataset_info(name)
    src = data.get_source(name, split, data_dir=data_dir)
    if in_memory:
        src = data.load_in_memory(src)
    with data.TrainLoader(
        src, info, global_batch_size=batch, seed=0, augment=augment, prefetch=prefetch, num_threads=threads
    ) as loader:
        for _ in range(3):
            next(loader)
        t = time.perf_counter()
        for _ in range(steps):
            next(loader)
        return steps * batch / (time.perf_counter() - t)


def main(argv=None) -> None:
    p = cli.parser("python -m titans.data.throughput", __doc__)
    p.add_argument("name", choices=data.DATASETS)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--data_dir", default=None)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--in_memory", action="store_true", help="read the split into RAM first")
    args = p.parse_args(argv)
    rate = measure(
        args.name, args.batch, args.steps, args.data_dir, args.prefetch, args.threads, in_memory=args.in_memory
    )
    print(
        f"{args.name}: {rate:,.0f} examples/s (batch {args.batch}, prefetch {args.prefetch}, "
        f"threads {args.threads}, in_memory {args.in_memory})"
    )


if __name__ == "__main__":
    main()
