"""Runs a cascade of finished Titans runs over a split: cheapest stage first, the next only where deferred.

    python -m titans.cascade.apply \
        --stages=workdirs/titans_fmnist/seed0/tiny_standard,workdirs/titans_fmnist/seed0/teacher \
        --gate=msp --rates=0.3

    # three stages: tiny defers 50% of the split to small, small defers 40% of what reaches it
    python -m titans.cascade.apply --stages=W/tiny_standard,W/small_standard,W/teacher --rates=0.5,0.4

Each ``--stages`` entry is a run directory (its config.json and latest checkpoint are loaded, frozen).
The threshold of stage i is chosen on ``--val_split`` so that a fraction ``rates[i]`` of the validation
examples *reaching* stage i is deferred; the cascade then runs on ``--split`` with
:class:`titans.cascade.CascadeRunner` (data-parallel over every local device) and prints its accuracy,
the fraction of examples each stage answered, the amortized XLA FLOPs per example, and the wall time
per example against the last stage run on everything. ``--out FILE`` writes the same as JSON.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from titans import cli as cli_lib
from titans import data as data_lib
from titans import parallel, runs
from titans.cascade import curves, evaluate, gates
from titans.cascade.runner import CascadeRunner


def _comma_list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def parser() -> cli_lib.ArgumentParser:
    p = cli_lib.parser("titans-cascade", __doc__)
    p.add_argument("--stages", required=True, type=_comma_list, help="run directories, comma-separated, cheapest first")
    p.add_argument("--gate", default="msp", help="gate of every non-final stage: msp, margin, entropy, defer_output")
    p.add_argument(
        "--rates",
        type=_comma_list,
        default=["0.3"],
        help="per non-final stage, comma-separated: fraction of the examples reaching it to defer, set on --val_split",
    )
    p.add_argument("--val_split", default="train[90%:]", help="split on which the thresholds are chosen")
    p.add_argument("--split", default="test", help="split the cascade runs on")
    p.add_argument("--batch_size", type=int, default=512, help="global batch (rounded up to a multiple of the devices)")
    p.add_argument("--out", default="", help="write the results as JSON to this file")
    return p


def load_stages(stage_dirs, rates):
    """(loaded runs [(model, config, info, step)], dataset info) of a cascade's stages, checked."""
    k = len(stage_dirs)
    if k < 2:
        raise ValueError("a cascade needs at least two --stages")
    if len(rates) != k - 1:
        raise ValueError(f"{k} stages need {k - 1} --rates (one per non-final stage), got {len(rates)}")
    loaded = [runs.load_model(d) for d in stage_dirs]
    info = loaded[-1][2]
    for d, (_, _, inf, _) in zip(stage_dirs, loaded):
        if (inf.name, inf.num_classes) != (info.name, info.num_classes):
            raise ValueError(
                f"stage {d} was trained on {inf.name} ({inf.num_classes} classes); the last stage on "
                f"{info.name} ({info.num_classes})"
            )
    return loaded, info


def choose_thresholds(stages, gate, rates, val_x, *, mesh, batch_size) -> list[float]:
    """Per non-final stage, the threshold that defers `rates[i]` of the validation examples reaching it
    (stage i sees the examples every earlier stage deferred)."""
    reach = np.arange(len(val_x))
    thresholds = []
    for i in range(len(stages) - 1):
        if len(reach) == 0:
            raise ValueError(f"no validation example reaches stage {i}; lower the earlier --rates")
        logits = runs.predict(evaluate.stage_logits, stages[i], val_x[reach], mesh=mesh, batch_size=batch_size)
        scores = np.asarray(jax.jit(jax.vmap(gate))(jnp.asarray(logits)))
        thresholds.append(curves.threshold_for_rate(scores, rates[i]))
        reach = reach[scores > thresholds[-1]]
    return thresholds


def run_cascade(stage_dirs, gate_name: str, rates, val_split: str, split: str, batch_size: int) -> dict:
    """The library form of this command; returns what it prints."""
    rates = [float(r) for r in rates]
    loaded, info = load_stages(stage_dirs, rates)
    k, C = len(stage_dirs), info.num_classes
    data_dir = loaded[-1][1].dataset.data_dir or None
    evaluate.check_threshold_split([cfg for _, cfg, _, _ in loaded], info, val_split)
    stages = [evaluate.NormalizedModel.of(m, info) for m, *_ in loaded]
    gate = gates.get_gate(gate_name, num_classes=C)
    mesh = parallel.make_mesh()
    batch_size = runs.round_up(batch_size, mesh.devices.size)
    val_x, _ = runs.split_arrays(data_lib.get_source(info.name, val_split, data_dir=data_dir), info)
    thresholds = choose_thresholds(stages, gate, rates, val_x, mesh=mesh, batch_size=batch_size)

    x, y = runs.split_arrays(data_lib.get_source(info.name, split, data_dir=data_dir), info)
    runner = CascadeRunner(stages, [gate] * (k - 1), thresholds, mesh=mesh)
    runner.warmup(x[:batch_size])
    preds, answered_by, sec = evaluate.run_runner(runner, x, batch_size)
    runs.predict(evaluate.stage_logits, stages[-1], x[:batch_size], mesh=mesh, batch_size=batch_size)  # compile
    t0 = time.perf_counter()
    last_logits = runs.predict(evaluate.stage_logits, stages[-1], x, mesh=mesh, batch_size=batch_size)
    last_sec = (time.perf_counter() - t0) / len(x)

    flops = [evaluate.flops_of(m, info, x) for m, *_ in loaded]
    gate_flops = gates.gate_flops(gate, C)
    reached = np.array([np.mean(answered_by >= i) for i in range(k)])
    amortized = float(sum(reached[i] * (flops[i] + (gate_flops if i < k - 1 else 0.0)) for i in range(k)))
    return {
        "stages": list(stage_dirs),
        "gate": gate_name,
        "val_split": val_split,
        "split": split,
        "examples": int(len(y)),
        "thresholds": [float(t) for t in thresholds],
        "target_rates": rates,
        "accuracy": float(np.mean(preds == y)),
        "last_stage_accuracy": float(np.mean(last_logits.argmax(-1) == y)),
        "answered_fraction": [float(np.mean(answered_by == i)) for i in range(k)],
        "reach_fraction": reached.tolist(),
        "flops_per_example": flops,
        "amortized_flops_per_example": amortized,
        "flops_fraction_of_last": amortized / flops[-1],
        "time_per_example_s": sec,
        "last_stage_time_per_example_s": last_sec,
        "backend": jax.default_backend(),
        "num_devices": int(mesh.devices.size),
    }


def main(args) -> None:
    cli_lib.setup_logging()
    try:
        out = run_cascade(args.stages, args.gate, args.rates, args.val_split, args.split, args.batch_size)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(
        f"cascade of {len(out['stages'])} stages on {out['split']} ({out['examples']} examples, gate {out['gate']}, "
        f"{out['num_devices']} {out['backend']} device(s))"
    )
    print("| stage | answered | reached | MFLOPs/example |\n|---|---:|---:|---:|")
    for d, a, r, f in zip(out["stages"], out["answered_fraction"], out["reach_fraction"], out["flops_per_example"]):
        print(f"| {d} | {a:.3f} | {r:.3f} | {f / 1e6:.3f} |")
    print(
        f"accuracy {out['accuracy']:.4f} (last stage alone {out['last_stage_accuracy']:.4f}); amortized "
        f"{out['amortized_flops_per_example'] / 1e6:.3f} MFLOPs/example = {out['flops_fraction_of_last']:.3f} of the "
        f"last stage's; wall {1e6 * out['time_per_example_s']:.1f} us/example vs "
        f"{1e6 * out['last_stage_time_per_example_s']:.1f} for the last stage alone"
    )
    if args.out:
        runs.write_text(args.out, json.dumps(out, indent=1))


def cli(argv: list[str] | None = None) -> None:
    main(parser().parse_args(argv))


if __name__ == "__main__":
    cli(sys.argv[1:])
