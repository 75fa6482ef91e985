"""The classical reference of the WordNet supersense benchmark: TF-IDF of character n-grams + logistic regression.

    python -m titans.data.tfidf_reference [--wordnet_dir=DIR] [--eval_split=test]

Each synset becomes "first lemma : gloss"; its character 2- to 5-grams (within word boundaries,
lower-cased, sublinear term frequency, seen in at least 2 training texts) are weighted by TF-IDF
and a multinomial logistic regression is fitted on the train split of `titans.data.text.split_of`.
It reads the raw WordNet files directly (no prepared dataset, no tokenizer) and prints the accuracy
on `eval_split` as JSON. docs/text.md gives its number and runtime.
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


def tfidf_reference(raw_dir: str | None = None, eval_split: str = "test") -> dict:
    """{'accuracy', 'num_train', 'num_eval', 'features', 'seconds'} of the reference on `eval_split`."""
    # scikit-learn costs about a second to import and only this reference needs it.
    from sklearn.feature_extraction.text import TfidfVectorizer  # noqa: PLC0415
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415

    t0 = time.perf_counter()
    splits = text.by_split(text.read_synsets(raw_dir))
    train, held = splits["train"], splits[eval_split]
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=NGRAMS, min_df=MIN_DF, sublinear_tf=True)
    x_train = vectorizer.fit_transform([reference_text(s) for s in train])
    x_eval = vectorizer.transform([reference_text(s) for s in held])
    y_train = np.array([s.label for s in train])
    y_eval = np.array([s.label for s in held])
    classifier = LogisticRegression(C=C, max_iter=MAX_ITER).fit(x_train, y_train)
    accuracy = float(np.mean(classifier.predict(x_eval) == y_eval))
    return {
        "accuracy": accuracy,
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
    args = parser.parse_args(argv)
    try:
        result = tfidf_reference(args.wordnet_dir, args.eval_split)
    except text.WordNetNotFoundError as e:
        print(e, file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
