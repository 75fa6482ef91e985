"""The classical reference of the WordNet supersense benchmark: TF-IDF of character n-grams + logistic regression.

    python -m titans.data.tfidf_reference [--wordnet_dir=DIR] [--eval_split=test] [--C=1,4,16] [--max_iter=N]

Each synset becomes "first lemma : gloss"; its character 2- to 5-grams (within word boundaries,
lower-cased, sublinear term frequency, seen in at least 2 training texts) are weighted by TF-IDF
and a multinomial logistic regression is fitted on the train split of `titans.data.text.split_of`.
With several values of the inverse regularisation C, each is fitted from scratch and the one with the best
validation accuracy is the reference; every C's validation and
`eval_split` accuracy is printed too. It reads the raw WordNet files directly (no prepared dataset, no
tokenizer) and prints JSON. docs/text.md gives its number and runtime.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from titans import cli as cli_lib
from titans.data import text

NGRAMS = (2, 5)
MIN_DF = 2
C = 1.0
MAX_ITER = 100


def reference_text(synset: text.Synset) -> str:
    return f"{synset.lemmas[0]} : {synset.gloss}"


def tfidf_reference(
    raw_dir: str | None = None, eval_split: str = "test", cs: tuple[float, ...] = (C,), max_iter: int = MAX_ITER
) -> dict:
    """{'accuracy', 'C', 'by_C', 'num_train', 'num_eval', 'features', 'seconds'}: the accuracy on `eval_split`
    of the C (among `cs`) with the best validation accuracy; `by_C` lists each C's accuracies, iterations
    and whether lbfgs converged."""
    # scikit-learn costs about a second to import and only this reference needs it.
    from sklearn.feature_extraction.text import TfidfVectorizer  # noqa: PLC0415
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415

    t0 = time.perf_counter()
    splits = text.by_split(text.read_synsets(raw_dir))
    train, held, val = splits["train"], splits[eval_split], splits["validation"]
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=NGRAMS, min_df=MIN_DF, sublinear_tf=True)
    x_train = vectorizer.fit_transform([reference_text(s) for s in train])
    x_eval = vectorizer.transform([reference_text(s) for s in held])
    x_val = vectorizer.transform([reference_text(s) for s in val])
    y_train, y_eval, y_val = (np.array([s.label for s in rows]) for rows in (train, held, val))
    by_c, predictions = [], {}
    for c in cs:
        # Each C from scratch: warm-started from the previous C's optimum, lbfgs met its tolerance at once
        # (0 iterations) and returned the previous C's weights.
        classifier = LogisticRegression(C=c, max_iter=max_iter).fit(x_train, y_train)
        iterations = int(np.max(classifier.n_iter_))
        predictions[c] = classifier.predict(x_eval)
        by_c.append(
            {
                "C": c,
                "validation_accuracy": float(np.mean(classifier.predict(x_val) == y_val)),
                "accuracy": float(np.mean(predictions[c] == y_eval)),
                "iterations": iterations,
                "converged": iterations < max_iter,
            }
        )
        print(f"tfidf_reference: {json.dumps(by_c[-1])}", file=sys.stderr, flush=True)  # one line per C
    best = max(by_c, key=lambda r: r["validation_accuracy"])
    return {
        "accuracy": best["accuracy"],
        # the chosen C's predicted class of every `eval_split` row, in the split's (and the dataset's) order
        "predictions": predictions[best["C"]].astype(int).tolist(),
        "C": best["C"],
        "by_C": by_c,
        "max_iter": max_iter,
        "eval_split": eval_split,
        "num_train": len(train),
        "num_eval": len(held),
        "features": int(x_train.shape[1]),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv=None) -> None:
    parser = cli_lib.parser("titans.data.tfidf_reference", __doc__)
    parser.add_argument("--wordnet_dir", default=None, help="default: $TITANS_WORDNET_DIR or /usr/share/wordnet")
    parser.add_argument("--eval_split", default="test", choices=text.SPLITS[1:])
    parser.add_argument("--C", default=str(C), help="comma-separated inverse regularisations, chosen on validation")
    parser.add_argument("--max_iter", type=int, default=MAX_ITER, help="lbfgs iterations per C")
    args = parser.parse_args(argv)
    try:
        cs = tuple(float(v) for v in args.C.split(","))
    except ValueError:
        parser.error(f"--C must be comma-separated numbers, got {args.C!r}")
    if not all(c > 0 for c in cs) or args.max_iter < 1:
        parser.error("--C values and --max_iter must be positive")
    try:
        result = tfidf_reference(args.wordnet_dir, args.eval_split, cs, args.max_iter)
    except text.WordNetNotFoundError as e:
        print(e, file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
