"""The config schema every Titans run shares, and the helpers that check and read it.

Each file in `configs/` builds on `base_config()` and overrides what it needs. `validate()` compares a
config against that schema so that a mistyped field (in a config file, on the command line, or in a
dict passed to `train_and_evaluate`) is refused with its name and the closest real fields, instead
of being silently ignored.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_collections

from titans import models


class ConfigError(ValueError):
    """A config that cannot be run: unknown field, bad value, or inconsistent choices."""


class Registry(Mapping):
    """Named choices a config field selects (objectives, gates): the only place a name is looked up.

        OBJECTIVES = Registry("objective", "distill.objective")

        @OBJECTIVES.register("my_objective")
        class MyObjective: ...

    A name is registered once (a second registration is refused, so two plug-ins cannot silently
    replace each other); `get` refuses an unknown name with its close matches. `meta` holds the
    keyword arguments a name was registered with (e.g. what a gate needs from the student).
    """

    def __init__(self, kind: str, field: str):
        self.kind, self.field = kind, field
        self._entries: dict[str, Any] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **meta):
        """Decorator: adds the decorated object under `name` and returns it unchanged."""

        def add(obj):
            if not isinstance(name, str) or not name:
                raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered ({self._entries[name]!r})")
            self._entries[name] = obj
            self._meta[name] = dict(meta)
            return obj

        return add

    def unregister(self, name: str) -> None:
        """Removes `name` (a plug-in defined for one session or one test)."""
        del self._entries[name], self._meta[name]

    def get(self, name: str, where: str = "the config"):
        """The entry called `name`; ConfigError naming `field`, the close matches and every registered name."""
        if isinstance(name, str) and name in self._entries:
            return self._entries[name]
        raise self.unknown(name, where)

    def unknown(self, name, where: str = "the config", also: Iterable[str] = ()) -> ConfigError:
        """The error for a name that is not registered (`also`: other valid names of the field)."""
        known = [*self._entries, *also]
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        return ConfigError(
            f"{where}: {self.field}={name!r} is not a registered {self.kind}.{hint} Registered: {', '.join(known)}."
        )

    def meta(self, name: str) -> dict[str, Any]:
        return dict(self._meta[name])

    def __getitem__(self, name: str):
        return self._entries[name]

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


# Checks of a run config that the layers above the schema add (titans.losses: `distill.objective` against the
# objective registry, and the chosen objective's own checks); `validate` runs them after its own.
_EXTRA_CHECKS: list[Callable[[ml_collections.ConfigDict, str], None]] = []


def register_check(check: Callable[[ml_collections.ConfigDict, str], None]):
    """Adds `check(run_config, where)` (raising ConfigError) to every `validate` of a run config."""
    if check not in _EXTRA_CHECKS:
        _EXTRA_CHECKS.append(check)
    return check


# Sub-configs whose keys are free-form (passed on to a constructor that checks them itself).
_FREE_FORM = ("model.kwargs",)


def base_config() -> ml_collections.ConfigDict:
    """The schema and defaults of a single training run (teacher or student)."""
    c = ml_collections.ConfigDict()
    c.name = "run"
    c.seed = 0

    c.dataset = _dataset_section()

    c.model = _model_section()

    # Compute dtype. Parameters and optimizer state are always float32.
    # "auto": bfloat16 on GPU/TPU, float32 on CPU.
    c.dtype = "auto"

    c.batch_size = 128  # global, over all devices and hosts
    c.eval_batch_size = 512
    # Duration: exactly one of these must be positive (big_vision-style resolver, see `steps()`).
    c.total_steps = 0
    c.total_epochs = 0.0

    c.optimizer = _optimizer_section()
    c.schedule = _schedule_section()
    # Distillation. Empty teacher_workdir = plain supervised training (a teacher run).
    c.distill = _distill_section()

    c.label_smoothing = 0.0

    # Masked-LM pre-training of a text Transformer (titans/models/mlm.py): the run learns to recover
    # corrupted tokens of the training split, its labels unread. A later run starts from it with init_from.
    c.mlm = _mlm_section()
    # A finished run's workdir ("@stage" in a pipeline): every parameter of this run's model but the classifier
    # starts from that run's (its backbone's, for a masked-LM run); "" = a fresh initialisation.
    c.init_from = ""

    c.checkpoint = _checkpoint_section()

    c.log_every_steps = 50
    c.eval_every_steps = 0  # 0 = only at the end
    c.ece_bins = 15

    # Profiler trace written to WORKDIR/profile for `num_steps` steps from `start_step` (-1 = off).
    c.profile = _profile_section()

    # Multi-process start-up; empty = single process (or auto-detected on Cloud TPU).
    c.distributed = _distributed_section()
    return c


IN_MEMORY = ("auto", "always", "never")
IN_MEMORY_AUTO_BYTES = 1 << 30


def _dataset_section() -> ml_collections.ConfigDict:
    """`dataset`: which TFDS dataset and splits a run trains and evaluates on."""
    d = ml_collections.ConfigDict()
    d.name = "fashion_mnist"
    d.data_dir = ""  # "" -> $TFDS_DATA_DIR or ~/tensorflow_datasets
    d.train_split = "train"
    d.eval_split = "test"
    d.augment = True  # only where the dataset calls for it (CIFAR, ImageNet), or where `augmentation` asks
    # "" = the dataset's own training transform (crop_flip for CIFAR, imagenet for ImageNet, none for
    # the others); "crop_flip" (pad 4, random crop, horizontal flip) or "none" override it.
    d.augmentation = ""
    # The training split read into RAM once before training ("auto": when its images have a fixed shape and
    # take at most 1 GiB, e.g. Fashion-MNIST's 47 MB; "always"; "never"): TFDS's per-record reads cost
    # 5.6 ms a batch of 128, on a thread that competes with the step for the cores.
    d.in_memory = "auto"
    # Text only: sort each window of this many training batches by length before cutting it into batches (the
    # batches then come in a random order), so that a batch's bucket fits its rows; 0 = off. With random
    # batches of 128 WordNet rows, 79% land in the 128-token bucket while the median row has 22 tokens.
    d.group_by_length = 0
    return d


def _model_section() -> ml_collections.ConfigDict:
    """`model`: the registered model name and its constructor's keyword arguments (free-form)."""
    m = ml_collections.ConfigDict()
    m.name = "cnn"
    m.kwargs = ml_collections.ConfigDict()
    return m


def _mlm_section() -> ml_collections.ConfigDict:
    """`mlm`: masked-language-model pre-training (text Transformers only)."""
    m = ml_collections.ConfigDict()
    m.enabled = False
    m.mask_rate = 0.15  # the share of each row's real tokens chosen (80% masked, 10% random, 10% kept)
    return m


def _optimizer_section() -> ml_collections.ConfigDict:
    """`optimizer`: the optimizer and its hyperparameters (fields unused by the chosen one are ignored)."""
    o = ml_collections.ConfigDict()
    o.name = "sgd"  # sgd | adamw | adam
    o.learning_rate = 0.05
    o.momentum = 0.9  # sgd
    o.nesterov = True  # sgd
    o.b1 = 0.9  # adam(w)
    o.b2 = 0.999  # adam(w)
    o.weight_decay = 5e-4  # decoupled for adamw, L2-as-gradient for sgd
    o.grad_clip_norm = 0.0  # 0 = off
    return o


def _schedule_section() -> ml_collections.ConfigDict:
    """`schedule`: the learning-rate schedule and its warmup."""
    s = ml_collections.ConfigDict()
    s.name = "cosine"  # cosine | constant | step
    s.warmup_steps = 0
    s.warmup_epochs = 0.0
    s.step_boundaries = (0.5, 0.75)  # fractions of training, for "step"
    s.step_factor = 0.1
    return s


def _distill_section() -> ml_collections.ConfigDict:
    """`distill`: the teacher, the distillation loss, the student objective and where soft labels come from."""
    d = ml_collections.ConfigDict()
    d.teacher_workdir = ""
    d.teacher_step = -1  # -1 = latest checkpoint of the teacher run (pinned in the student's checkpoint)
    d.allow_unfinished_teacher = False  # distil from a teacher run that has no results.json yet
    d.loss = "kd"  # kd (Hinton) | hard (CE on teacher argmax)
    d.alpha = 0.9  # weight of the distillation term; (1 - alpha) on labelled CE
    d.temperature = 4.0
    # Student objective (docs/methods.md#cascades): a name in titans.losses.OBJECTIVES (built in: standard |
    # easy_weighted | flatten | defer | defer_ms | easy_budget; a plug-in registers its own). easy_weighted and
    # flatten read their per-example easiness from `easy` (flatten: hardness = 1 - easiness); easy_budget `budget`.
    d.objective = "standard"
    d.easy = _distill_easy_section()
    d.defer_weight = 1.0  # scales the "defer" term of the learning-to-defer surrogate
    d.defer_cost = 0.0  # cost of one deferral in [0, 1]: deferring pays only the teacher's advantage above it
    d.budget = _distill_budget_section()
    # Cross-fitting (titans/teachers/crossfit.py): comma-separated teacher runs trained on different folds of
    # the training split; each training row's teacher outputs (soft labels, correctness) come from a listed
    # teacher that did not train on it. "" = the one teacher of teacher_workdir.
    d.crossfit_teachers = ""
    # Objectives that read "is the teacher right on this row" refuse a teacher that trained on the student's
    # rows (it is right and sure almost everywhere there) unless this is set.
    d.allow_in_sample_teacher = False
    # Where the soft labels come from (titans/teachers, docs/teachers.md): online (the teacher's forward
    # inside the student step) | cache (outputs written beforehand by `python -m titans.teachers.cache`)
    # | service (an elastic pool of teacher actors on Ray).
    d.teacher_mode = "online"
    d.cache = _distill_cache_section()
    d.service = _distill_service_section()
    return d


def _distill_easy_section() -> ml_collections.ConfigDict:
    """`distill.easy`: how the "easy_weighted" objective weights each example by its easiness."""
    e = ml_collections.ConfigDict()
    e.rule = "confidence"  # confidence | margin | correctness | agreement
    e.sharpness = 2.0  # weight = floor + (1 - floor) * easiness ** sharpness
    e.floor = 0.1
    e.warmup_steps = 0  # "agreement" uses weight 1 before this step
    e.strength = 1.0  # the strength sweep: weight ** strength (1 = the weight above; larger = fewer rows kept)
    return e


def _distill_budget_section() -> ml_collections.ConfigDict:
    """`distill.budget`: the "easy_budget" objective's subset sized to the cascade's deferral rate."""
    b = ml_collections.ConfigDict()
    b.rate = 0.25  # the hardest round(rate * N) training rows are the teacher's
    b.score = "teacher_loss"  # teacher_loss | student_loss | teacher_right_student_wrong (titans.losses)
    b.treatment = "drop"  # drop (weight 0) | flatten (uniform target) | defer (abstain target, C + 1 outputs)
    b.reference_workdir = ""  # a finished standard-KD student run (the first pass), for the student scores
    return b


def _distill_cache_section() -> ml_collections.ConfigDict:
    """`distill.cache`: the offline teacher cache read in teacher_mode="cache"."""
    c = ml_collections.ConfigDict()
    c.dir = ""  # the cache directory (manifest.json + shards)
    c.topk = 0  # 0 = full logits; k = the cache holds the teacher's top-k values + classes
    c.dtype = "float32"  # float32 | bfloat16 | float16 (storage)
    return c


def _distill_service_section() -> ml_collections.ConfigDict:
    """`distill.service`: the Ray pool of teacher actors used in teacher_mode="service"."""
    s = ml_collections.ConfigDict()
    s.address = ""  # "" = start a local Ray on 127.0.0.1; else "HOST:6379", "auto", "ray://..."
    s.min_workers = 1
    s.max_workers = 2
    s.kinds = ("cpu",)  # worker kinds tried in order: cpu | gpu
    s.cpus_per_worker = 1.0
    s.gpus_per_worker = 1.0  # for "gpu" workers
    s.local_cpus = 0  # CPUs of a local Ray (0 = max_workers * cpus_per_worker)
    s.max_in_flight = 8  # batches submitted ahead of the student step
    s.batch_timeout_s = 120.0  # a worker silent this long on a batch is replaced
    s.start_timeout_s = 300.0  # wait this long for min_workers (at least 1) to be ready
    s.scale_interval_s = 2.0  # how often the pool looks for free resources / replaces workers
    return s


def _checkpoint_section() -> ml_collections.ConfigDict:
    """`checkpoint`: how often checkpoints are saved, how many are kept, which one a run restores."""
    c = ml_collections.ConfigDict()
    c.every_steps = 500
    c.keep = 3
    c.async_save = True
    c.restore_step = -1  # -1 = latest; an earlier step moves the later ones to checkpoints_superseded/
    # Comma-separated fields that may differ from the checkpoint's config on resume ("teacher": the
    # teacher's variables; "*": any); each allowed change is recorded in WORKDIR/config_changes.jsonl.
    c.allow_changes = ""
    # Read a step whose checksums were never recorded (its save did not complete, or an old Titans wrote
    # it). Off: such a step is refused, and an automatic resume falls back to the newest verified step.
    c.allow_unverified = False
    return c


def _profile_section() -> ml_collections.ConfigDict:
    """`profile`: which steps the profiler traces (off by default)."""
    p = ml_collections.ConfigDict()
    p.start_step = -1
    p.num_steps = 5
    return p


def _distributed_section() -> ml_collections.ConfigDict:
    """`distributed`: how the processes of a multi-process run find each other."""
    d = ml_collections.ConfigDict()
    d.coordinator_address = ""
    d.num_processes = 0
    d.process_id = -1
    return d


def _flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict) and name not in _FREE_FORM:
            out.update(_flat_keys(value, name + "."))
        else:
            out[name] = value
    return out


def _unknown_error(name: str, known: Iterable[str], where: str) -> ConfigError:
    known = sorted(known)
    parent, _, leaf = name.rpartition(".")
    siblings = [k for k in known if k.rpartition(".")[0] == parent]
    if siblings:
        # The section exists: suggest its fields whose names the leaf abbreviates ("optimizer.lr" ->
        # "optimizer.learning_rate"), then its fields with a similar name.
        by_leaf = {k.rpartition(".")[2]: k for k in siblings}
        close = [k for k in siblings if _abbreviates(leaf, k.rpartition(".")[2])][:3]
        close += [
            by_leaf[m]
            for m in difflib.get_close_matches(leaf, list(by_leaf), n=4, cutoff=0.6)
            if by_leaf[m] not in close
        ]
    else:
        close = []
    if not close:
        close = difflib.get_close_matches(name, known, n=4, cutoff=0.6)
    close = close[:4]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ConfigError(f"Unknown config field '{name}' in {where}.{hint}")


def _abbreviates(short: str, long: str) -> bool:
    """True if `short` starts like `long` and its letters appear in `long` in order."""
    if not short or short[0] != long[0]:
        return False
    it = iter(long)
    return all(ch in it for ch in short)


def validate(config: ml_collections.ConfigDict | dict, where: str = "the config") -> ml_collections.ConfigDict:
    """Checks a run config against `base_config()`; returns it as a ConfigDict.

    Raises ConfigError naming the first unknown field and its close matches, or a bad value.
    A config with `stages` (a pipeline) has each stage validated on its own. The checks that layers
    above add with `register_check` run too: titans.losses checks `distill.objective` against its
    registry (every module that trains or loads a run imports titans.losses).
    """
    if isinstance(config, dict):
        config = ml_collections.ConfigDict(config)
    if "stages" in config:
        for name in config.stage_order:
            if name not in config.stages:
                raise ConfigError(f"stage_order names '{name}', which is not in stages ({list(config.stages)}).")
        for name, stage in config.stages.items():
            validate(stage, where=f"stage '{name}'")
        return config
    known = _flat_keys(base_config())
    for name in _flat_keys(config):
        if name not in known:
            raise _unknown_error(name, known, where)
    _check_values(config, where)
    return config


def _check_values(c: ml_collections.ConfigDict, where: str) -> None:
    def choice(field, value, options):
        if value not in options:
            raise ConfigError(f"{where}: {field}={value!r} is not one of {list(options)}.")

    choice("optimizer.name", c.optimizer.name, ("sgd", "adamw", "adam"))
    choice("schedule.name", c.schedule.name, ("cosine", "constant", "step"))
    choice("distill.loss", c.distill.loss, ("kd", "hard"))
    choice("dataset.augmentation", c.dataset.augmentation, ("", "none", "crop_flip"))
    choice("dataset.in_memory", c.dataset.in_memory, IN_MEMORY)
    choice("dtype", c.dtype, ("auto", "float32", "bfloat16"))
    choice("distill.easy.rule", c.distill.easy.rule, ("confidence", "margin", "correctness", "agreement"))
    _check_teacher_mode(c, where, choice)
    if (c.total_steps > 0) == (c.total_epochs > 0):
        raise ConfigError(
            f"{where}: set exactly one of total_steps and total_epochs "
            f"(got total_steps={c.total_steps}, total_epochs={c.total_epochs})."
        )
    if not 0.0 <= c.distill.alpha <= 1.0:
        raise ConfigError(f"{where}: distill.alpha={c.distill.alpha} must be in [0, 1].")
    if not 0.0 <= c.distill.defer_cost <= 1.0:
        raise ConfigError(f"{where}: distill.defer_cost={c.distill.defer_cost} must be in [0, 1].")
    if not math.isfinite(c.distill.temperature) or c.distill.temperature <= 0:
        raise ConfigError(f"{where}: distill.temperature={c.distill.temperature!r} must be a finite number > 0.")
    if c.batch_size <= 0 or c.eval_batch_size <= 0:
        raise ConfigError(f"{where}: batch sizes must be positive.")
    _check_numbers(c, where)
    _check_model_kwargs(c, where)
    _check_mlm(c, where)
    for check in _EXTRA_CHECKS:
        check(c, where)


def _check_mlm(c: ml_collections.ConfigDict, where: str) -> None:
    """Masked-LM pre-training reads no labels and no teacher; a pre-training run starts from nothing else."""
    mlm = c.get("mlm")
    if mlm is None or not mlm.enabled:
        return
    if not 0.0 < mlm.mask_rate < 1.0:
        raise ConfigError(f"{where}: mlm.mask_rate={mlm.mask_rate} must be in (0, 1).")
    if c.distill.teacher_workdir:
        raise ConfigError(f"{where}: mlm.enabled pre-trains without a teacher; leave distill.teacher_workdir empty.")


def _check_numbers(c: ml_collections.ConfigDict, where: str) -> None:
    """Intervals and rates that would fail (or silently misbehave) only after compilation."""
    for field, value in (("checkpoint.every_steps", c.checkpoint.every_steps), ("log_every_steps", c.log_every_steps)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: {field}={value!r} must be a positive number of steps.")
    if c.eval_every_steps < 0:
        raise ConfigError(f"{where}: eval_every_steps={c.eval_every_steps} must be >= 0 (0 = only at the end).")
    o = c.optimizer
    for field, value in (
        ("optimizer.learning_rate", o.learning_rate),
        ("optimizer.weight_decay", o.weight_decay),
        ("optimizer.grad_clip_norm", o.grad_clip_norm),
    ):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{where}: {field}={value!r} must be a finite number >= 0.")
    if o.learning_rate == 0:
        raise ConfigError(f"{where}: optimizer.learning_rate=0 would train nothing.")


def _check_model_kwargs(c: ml_collections.ConfigDict, where: str) -> None:
    """model.kwargs against the model's constructor: a misspelt argument names its close matches."""
    if c.model.name not in models.MODEL_NAMES:
        close = difflib.get_close_matches(str(c.model.name), models.MODEL_NAMES, n=4, cutoff=0.5)
        raise ConfigError(
            f"{where}: model.name={c.model.name!r} is not a Titans model."
            + (f" Did you mean: {', '.join(close)}?" if close else "")
        )
    accepted = models.model_kwargs(c.model.name)
    for key in c.model.kwargs:
        if key not in accepted:
            close = difflib.get_close_matches(key, list(accepted), n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"{where}: model.kwargs.{key} is not an argument of model {c.model.name!r} "
                f"(it takes: {', '.join(accepted) or 'none'}).{hint}"
            )


def _check_teacher_mode(c: ml_collections.ConfigDict, where: str, choice) -> None:
    d = c.distill
    choice("distill.teacher_mode", d.teacher_mode, ("online", "cache", "service"))
    choice("distill.cache.dtype", d.cache.dtype, ("float32", "bfloat16", "float16"))
    for kind in d.service.kinds:
        choice("distill.service.kinds[]", kind, ("cpu", "gpu"))
    if d.teacher_mode != "online" and not d.teacher_workdir:
        raise ConfigError(
            f"{where}: distill.teacher_mode={d.teacher_mode!r} needs a teacher (set distill.teacher_workdir)."
        )
    if d.teacher_mode == "cache" and not d.cache.dir:
        raise ConfigError(
            f"{where}: distill.teacher_mode='cache' needs distill.cache.dir (written by "
            f"`python -m titans.teachers.cache`)."
        )
    if d.cache.topk < 0:
        raise ConfigError(f"{where}: distill.cache.topk={d.cache.topk} must be >= 0 (0 = full logits).")
    s = d.service
    if not (0 <= s.min_workers <= s.max_workers and s.max_workers >= 1):
        raise ConfigError(
            f"{where}: need 0 <= distill.service.min_workers ({s.min_workers}) <= "
            f"distill.service.max_workers ({s.max_workers}) and max_workers >= 1."
        )
    if s.max_in_flight < 1:
        raise ConfigError(f"{where}: distill.service.max_in_flight must be >= 1.")


def check_override(config: ml_collections.ConfigDict, dotted: str) -> None:
    """Raises ConfigError if `--config.<dotted>=...` names no field of `config`."""
    node: Any = config
    walked = []
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            if isinstance(node, ml_collections.ConfigDict) and ".".join(walked) in _FREE_FORM:
                _check_kwargs_override(config, part)
                return
            known = _flat_keys(config) if "stages" not in config else _flat_pipeline_keys(config)
            raise _unknown_error(dotted, known, "the command-line overrides")
        walked.append(part)
        node = node[part]


def _check_kwargs_override(config: ml_collections.ConfigDict, key: str) -> None:
    """`--config.model.kwargs.KEY=...` for a KEY the config file does not set: refused with the model's
    arguments and the close matches (the command line can change a field, not add one)."""
    name = config.model.name
    accepted = models.model_kwargs(name) if name in models.MODEL_NAMES else ()
    if key in accepted:
        raise ConfigError(
            f"model.kwargs.{key} is an argument of model {name!r}, but the config file does not set it, and the "
            f"command line can only change fields the config defines: add `model.kwargs.{key}` to the config."
        )
    close = difflib.get_close_matches(key, list(accepted) + list(config.model.kwargs), n=3, cutoff=0.5)
    raise ConfigError(
        f"model.kwargs.{key} is not an argument of model {name!r} (it takes: {', '.join(accepted) or 'none'})."
        + (f" Did you mean: {', '.join(dict.fromkeys(close))}?" if close else "")
    )


def _flat_pipeline_keys(config) -> dict[str, Any]:
    keys = {}
    for name, stage in config.stages.items():
        keys.update({f"stages.{name}.{k}": v for k, v in _flat_keys(stage).items()})
    return keys


def steps(config: ml_collections.ConfigDict, num_examples: int, *, prefix: str = "total") -> int:
    """Resolves `{prefix}_steps` or `{prefix}_epochs` into a number of optimizer steps."""
    n_steps = config.get(f"{prefix}_steps", 0)
    n_epochs = config.get(f"{prefix}_epochs", 0)
    if n_steps and n_steps > 0:
        return int(n_steps)
    if n_epochs and n_epochs > 0:
        return max(1, int(round(n_epochs * num_examples / config.batch_size)))
    return 0


def warmup_steps(config: ml_collections.ConfigDict, num_examples: int) -> int:
    s = config.schedule
    if s.warmup_steps > 0:
        return int(s.warmup_steps)
    return int(round(s.warmup_epochs * num_examples / config.batch_size))


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]` the way `--config=` does: the module's get_config(arg)."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("titans_config_module", path)
    if module_spec is None:
        raise ConfigError(f"Config file {path!r} cannot be loaded.")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def flat_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{dotted field: value} with values as JSON would give them back (tuples as lists)."""
    flat = _flat_keys(config)
    return json.loads(
        json.dumps({k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in flat.items()}, default=list)
    )


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object (e.g. the fields that fix a checkpoint's shape)."""
    blob = json.dumps(obj, sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
