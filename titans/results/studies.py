"""The registry of studies: which raw files each keeps, and how its page is generated from them."""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
from collections.abc import Callable

from titans import paths
from titans.active import report as active_report
from titans.cascade import report as cascade_report
from titans.ensemble import report as ensemble_report
from titans.results import claims, text_teacher
from titans.results import logits as logits_codec

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GENERATED_MARK = "<!-- Generated below by `titans-results rebuild` from results/{name}/: do not edit by hand. -->"


def _run_dirs(study_dir: str) -> list[str]:
    """Every run directory (one holding a seed's raw files) under a study, sorted."""
    found = {os.path.dirname(p) for p in glob.glob(os.path.join(study_dir, "**", "*.json"), recursive=True)}
    return sorted(d for d in found if os.path.basename(d).startswith("seed"))


def _cascade_page(study_dir: str, primary: tuple = cascade_report.PRIMARY) -> str:
    dirs = _run_dirs(study_dir)
    logits = [logits_codec.load(os.path.join(d, LOGITS_FILE)) for d in dirs]
    return cascade_report.render(cascade_report.load(dirs), logits, primary=primary)


def _ensemble_page(study_dir: str) -> str:
    return ensemble_report.render(ensemble_report.load(_run_dirs(study_dir)))


def _active_settings(study_dir: str) -> dict[str, list[dict]]:
    """{setting: its runs} for every setting directory of the active study (ablations included)."""
    return {
        setting: active_report.load(os.path.join(study_dir, setting, "seed*"))
        for setting in sorted(os.listdir(study_dir))
        if os.path.isdir(os.path.join(study_dir, setting))
    }


def _active_page(study_dir: str, primary: tuple | None = None) -> str:
    return active_report.render(_active_settings(study_dir), primary=primary)


def _text_teacher_page(study_dir: str) -> str:
    return text_teacher.render(text_teacher.load(_run_dirs(study_dir)))


def _cascade_plot(study_dir: str, out_path: str) -> None:
    cascade_report.plot_mean_curves(cascade_report.load(_run_dirs(study_dir)), out_path)


def _active_plot(study_dir: str, out_path: str) -> None:
    settings = {
        label: (runs, active_report.aggregate(runs))
        for label, runs in _active_settings(study_dir).items()
        if active_report.ABLATION_SUFFIX not in label
    }
    active_report.plot(settings, out_path)


@dataclasses.dataclass(frozen=True)
class Study:
    """`files`: what `collect` copies from a run directory; `render`: results/<name> -> generated Markdown;
    `plot`: (results/<name>, path) -> draws the page's figure (not compared by --check: images differ
    across matplotlib versions)."""

    name: str
    files: tuple[str, ...]
    render: Callable[[str], str]
    plot: Callable[[str, str], None] | None = None

    def raw_dir(self, root: str = REPO) -> str:
        return os.path.join(root, "results", self.name)

    def doc_path(self, root: str = REPO) -> str:
        return os.path.join(root, "docs", "results", f"{self.name}.md")

    def plot_path(self, root: str = REPO) -> str:
        return os.path.join(root, "docs", "results", f"{self.name}.png")


LOGITS_FILE = "cascade_logits.npz"  # stored 8 bits a logit (titans/results/logits.py)
_CASCADE = ("cascade.json", LOGITS_FILE)
STUDIES = {
    s.name: s
    for s in (
        Study("titans_fmnist", _CASCADE, _cascade_page, _cascade_plot),
        Study("bdistil_fmnist", ("ensemble.json",), _ensemble_page),
        Study("active_fmnist", ("active.json",), _active_page, _active_plot),
        # The strong-teacher regime (ResNet-20 teacher at 0.9435, students down to a linear model).
        Study("titans_fmnist_strong", _CASCADE, _cascade_page, _cascade_plot),
        Study("bdistil_fmnist_strong", ("ensemble.json",), _ensemble_page),
        Study("active_fmnist_strong", ("active.json",), _active_page, _active_plot),
        # Text: the Transformer teacher of configs/wordnet_teacher.py against the TF-IDF reference, and the
        # cascades of configs/titans_wordnet.py (primary claim declared on the 1-D CNN student).
        Study("wordnet_teacher", (text_teacher.RECORD_FILE,), _text_teacher_page),
        # Robust active distillation on text (configs/active_wordnet.py), primary claim declared before the runs.
        Study(
            "active_wordnet",
            ("active.json",),
            functools.partial(_active_page, primary=("mlm", "margin", 1)),
            _active_plot,
        ),
        Study(
            "titans_wordnet",
            _CASCADE,
            functools.partial(_cascade_page, primary=("cnn_easy", "cnn_standard", 0.25)),
            _cascade_plot,
        ),
    )
}


def _compact(value, digits: int = 7):
    """Floats rounded to `digits` significant digits (float32 precision), NaN/inf as null: small, strict JSON."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _compact(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_compact(v, digits) for v in value]
    return value


class CollectError(ValueError):
    """A run directory or destination that `collect` refuses (unfinished run, bad path, a symbolic link)."""


def _no_links(path: str, stop: str) -> None:
    """Raises CollectError when `path` or any directory between `stop` and it is a symbolic link."""
    stop = os.path.realpath(stop)
    here = os.path.abspath(path)
    while True:
        if os.path.islink(here):
            raise CollectError(f"{here} is a symbolic link; collect neither follows nor writes through links.")
        if os.path.realpath(here) == stop or os.path.dirname(here) == here:
            return
        here = os.path.dirname(here)


def _check_dest(study: Study, dest: str, root: str) -> str:
    parts = dest.replace("\\", "/").split("/")
    if os.path.isabs(dest) or any(p in ("", ".", "..") for p in parts) or not parts[-1].startswith("seed"):
        raise CollectError(
            f"dest must be a relative path of plain names ending in a seed directory (e.g. seed0 or good/seed0), "
            f"got {dest!r}."
        )
    out_dir = os.path.join(study.raw_dir(root), *parts)
    _no_links(out_dir, root)
    return out_dir


def _source_files(study: Study, run_dir: str) -> dict[str, str]:
    """{file name: path} of the study's files in `run_dir` (local or remote), refusing links and gaps."""
    if not paths.is_remote(run_dir) and not os.path.isdir(run_dir):
        raise CollectError(f"{run_dir} is not a directory.")
    found = {f: paths.join(run_dir, f) for f in study.files}
    missing = [f for f, p in found.items() if not paths.exists(p)]
    if missing:
        raise CollectError(f"{run_dir} lacks {missing}: the run has not finished (study {study.name}).")
    if not paths.is_remote(run_dir):
        for path in found.values():
            _no_links(path, run_dir)
    return found


def collect(study: Study, run_dir: str, dest: str, root: str = REPO) -> list[str]:
    """Copies the raw files of one finished run into results/<study>/<dest>; JSON is written compactly,
    cascade logits in 8 bits (titans/results/logits.py).

    Symbolic links are refused on both sides (a link in the run would copy in a file from elsewhere; one
    under results/ would write outside the repository), and so is a `dest` that is not plain names."""
    out_dir = _check_dest(study, dest, root)
    found = _source_files(study, run_dir)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for f, src in found.items():
        dst = os.path.join(out_dir, f)
        if os.path.islink(dst):
            raise CollectError(f"{dst} is a symbolic link; remove it first.")
        if f.endswith(".json"):
            data = _compact(json.loads(paths.read_text(src)))
            paths.write_text(dst, json.dumps(data, separators=(",", ":"), allow_nan=False) + "\n")
        elif f == LOGITS_FILE:  # 8 bits a logit (titans/results/logits.py), not the run's float16
            logits_codec.save(dst, logits_codec.loads(paths.resolve(src).read_bytes(), where=str(src)))
        else:
            paths.write_bytes(dst, paths.resolve(src).read_bytes())
        written.append(dst)
    return written


def render_page(study: Study, root: str = REPO) -> str:
    """The whole page: the study's hand-written head, the generated-part marker, the generated tables."""
    raw = study.raw_dir(root)
    with open(os.path.join(raw, "README.md")) as f:
        head = f.read().rstrip() + "\n"
    return head + "\n" + GENERATED_MARK.format(name=study.name) + "\n\n" + study.render(raw)


README_BEGIN = "<!-- results table: generated by `titans-results rebuild` from results/; do not edit -->"
README_END = "<!-- end of the results table -->"
VERDICTS = ("reproduced", "not reproduced", "unresolved")


def claim_verdicts(page: str) -> list[str]:
    """The verdicts of a rendered page's "Claims and verdicts" table, in order."""
    if "## Claims and verdicts" not in page:
        return []
    section = page.split("## Claims and verdicts", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| claim")]
    return [row.rstrip(" |").rsplit("|", 1)[1].strip() for row in rows]


def readme_table(pages: dict[str, str]) -> str:
    """README's results table: per study, its page and how many of its claims each verdict holds."""
    lines = [
        "| study | claims | reproduced | not reproduced | unresolved |",
        "|---|---|---|---|---|",
    ]
    for name, page in pages.items():
        verdicts = claim_verdicts(page)
        title = page.splitlines()[0].lstrip("# ").split(":")[0]
        counts = " | ".join(str(verdicts.count(v)) for v in VERDICTS)
        lines.append(f"| [{title}](docs/results/{name}.md) | {len(verdicts)} | {counts} |")
    return "\n".join(lines)


def _with_readme_table(readme: str, table: str) -> str:
    if README_BEGIN not in readme or README_END not in readme:
        raise ValueError(f"README.md lacks the results-table markers {README_BEGIN!r} ... {README_END!r}")
    before, rest = readme.split(README_BEGIN, 1)
    after = rest.split(README_END, 1)[1]
    return f"{before}{README_BEGIN}\n{table}\n{README_END}{after}"


def _update(path: str, text: str, check: bool, changed: list[str]) -> None:
    old = None
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    if text != old:
        changed.append(path)
        if not check:
            paths.write_text(path, text)


def rebuild(root: str = REPO, check: bool = False, only: tuple[str, ...] = ()) -> list[str]:
    """Regenerates docs/results/<study>.md for every study with raw outputs, and README.md's results table
    from them; returns the files that changed (with `check`, writes nothing and only reports them)."""
    changed, pages = [], {}
    for name, study in STUDIES.items():
        if not os.path.isdir(study.raw_dir(root)):
            continue
        pages[name] = render_page(study, root)
        if not only or name in only:
            _update(study.doc_path(root), pages[name], check, changed)
    readme = os.path.join(root, "README.md")
    if os.path.exists(readme):
        with open(readme) as f:
            _update(readme, _with_readme_table(f.read(), readme_table(pages)), check, changed)
    return changed


def unbacked_claims(root: str = REPO) -> dict[str, list[str]]:
    """{file: its unbacked numbers} for every study head (results/<study>/README.md) and README.md's Results
    section: the result numbers they state that no generated table gives (`claims.unbacked`; a head may cite
    another study's numbers, e.g. a teacher's accuracy)."""
    generated = {
        name: study.render(study.raw_dir(root)) for name, study in STUDIES.items() if os.path.isdir(study.raw_dir(root))
    }
    everything = "\n".join(generated.values())
    texts = {}  # file -> (its prose, the generated text that backs it)
    for name in generated:
        with open(os.path.join(STUDIES[name].raw_dir(root), "README.md")) as f:
            texts[os.path.join("results", name, "README.md")] = (f.read(), generated[name])
    readme = os.path.join(root, "README.md")
    if os.path.exists(readme):
        with open(readme) as f:
            section = f.read().split("\n## Results", 1)[-1].split("\n## ", 1)[0]
        texts["README.md"] = (section.split(README_BEGIN, 1)[0] + section.split(README_END, 1)[-1], everything)
    found = {path: claims.unbacked(text, own, everything) for path, (text, own) in texts.items()}
    return {path: numbers for path, numbers in found.items() if numbers}


def plot_all(root: str = REPO, only: tuple[str, ...] = ()) -> list[str]:
    """Redraws every study's figure (docs/results/<study>.png) from its raw outputs."""
    drawn = []
    for name, study in STUDIES.items():
        if (only and name not in only) or study.plot is None or not os.path.isdir(study.raw_dir(root)):
            continue
        study.plot(study.raw_dir(root), study.plot_path(root))
        drawn.append(study.plot_path(root))
    return drawn
