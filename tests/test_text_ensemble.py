"""B-DISTIL and robust active distillation on text: the connection between text members (a pooled hidden
state, padding kept out), configs/bdistil_wordnet.py and configs/active_wordnet.py end to end at small sizes
on the WordNet benchmark, from a small text teacher."""

import json
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from titans import checkpoint, data, experiment, models, runs
from titans.active import config as active_config
from titans.active import loop, selection
from titans.active.student import StudentTrainer
from titans.config import load_config_file
from titans.data import text
from titans.ensemble import config as ens_config
from titans.ensemble import load, members, runner

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _tokens(lengths, width, vocab=50, seed=0):
    """Token ids (N, width): row i has lengths[i] ids in 1..vocab-1, then padding (0)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        out[i, :n] = rng.integers(1, vocab, n)
    return out


def _text_model(name, seed, **kwargs):
    return models.create_model(name, num_classes=7, input_shape=(32,), rngs=nnx.Rngs(seed), vocab_size=50, **kwargs)


@pytest.mark.parametrize("layer,dim", [("features", 8), ("stage1", 6)])
def test_text_connection_reads_a_pooled_state_that_extra_padding_leaves_unchanged(layer, dim):
    """Member 2 reads member 1's (text CNNs) `features` (pooled by the model) or its per-token `stage1` (pooled
    by the connection over the real tokens: the CNN's outputs at padding positions are relu(bias), not zero). The same rows padded to 16 or to 32 tokens give the same ensemble logits, in
    the module and in the frozen members the trainer runs; the connection changes member 2's logits."""
    first = _text_model("text_cnn", 1, embed_dim=8, channels=(6,), dense=8)
    frozen1 = members.Ensemble([first], connected=(False,), layer=layer).frozen()
    assert members.activation_dim(frozen1, (32,), "text") == dim
    second = members.ConnectedMember(
        _text_model("text_cnn", 2, embed_dim=8, channels=(6,), dense=8),
        dim,
        join="concat",
        width=4,
        num_classes=7,
        rngs=nnx.Rngs(3),
    )
    ens = members.Ensemble([first, second], connected=(False, True), layer=layer)
    short = jnp.asarray(_tokens([3, 16, 1, 9], 16))
    long = jnp.pad(short, ((0, 0), (0, 16)))
    np.testing.assert_allclose(ens.member_logits(short), ens.member_logits(long), atol=1e-5)
    own, prev = ens.frozen().apply(long)
    np.testing.assert_allclose(own, ens.member_logits(short), atol=1e-5)
    _, acts = first(short, capture=True)
    act = np.asarray(acts[layer])
    want = act if act.ndim == 2 else np.stack([act[i, :n].mean(0) for i, n in enumerate([3, 16, 1, 9])])
    np.testing.assert_allclose(frozen1.apply(long)[1], want, atol=1e-5)
    assert np.abs(np.asarray(second(short, prev=jnp.asarray(want)) - second(short))).max() > 1e-3
    assert members.flops_per_example(second, (16,)) > members.flops_per_example(second.base, (16,))


def test_wordnet_configs_validate_with_their_defaults():
    config = load_config_file(str(ROOT / "configs" / "bdistil_wordnet.py"))
    e = ens_config.section(config)
    assert set(e.candidates) == {"bag", "bag_wide", "cnn_small", "cnn", "tx_small", "tx_mid"}
    assert "tx_deep" in e.no_resched and e.connect.layer == "features" and e.member.dataset.name == "wordnet"
    assert e.edge_split == "validation[:50%]" and e.member.distill.teacher_mode == "cache"
    active = active_config.validate(load_config_file(str(ROOT / "configs" / "active_wordnet.py")))
    assert active.dataset.name == "wordnet" and active.student.model.name == "text_cnn"
    assert active.active.rounds * active.active.budget_per_round * 10 <= 11_819 - 500 - 1000  # pool >= 10x budget
    with pytest.raises(ValueError, match="Unknown sizes"):
        load_config_file(str(ROOT / "configs" / "bdistil_wordnet.py:sizes=bag+nope"))


def _bdistil_config(text_teacher, data_dir):
    arg = (
        f"teacher_dir={text_teacher / 'teacher'},cache_dir={text_teacher / 'cache'},train_split=train[:2000],"
        "edge_split=,val_split=validation[:300],test_split=test[:400],epochs=2,sizes=bag,rounds=2,gamma=0,"
        "variants=bdistil"
    )
    config = load_config_file(f"{ROOT / 'configs' / 'bdistil_wordnet.py'}:{arg}")
    config.ensemble.member.dataset.data_dir = data_dir
    config.ensemble.member.optimizer.learning_rate = 1e-2
    return config


def _connection_gradient(config, spec, frozen1, tokens, model):
    """The largest |d sum(F_2) / d proj.kernel| of member 2's training forward (the Method the trainer runs)."""
    ctx = types.SimpleNamespace(e=ens_config.section(config), member=config.ensemble.member)
    method = runner._member_method(False, spec, frozen1, np.ones(2000, np.float32), ctx)
    g, params, rest = nnx.split(model, nnx.Param, ...)

    def total(p):
        logits, _ = method.forward(nnx.merge(g, p, rest), tokens, method.frozen, True)
        return jnp.sum(logits)

    return float(jnp.abs(jax.grad(total)(params)["proj"]["kernel"].get_value()).max())


def test_bdistil_wordnet_config_runs_on_text_and_the_connection_feeds_the_next_member(data_dir, text_teacher, tmp_path):
    """configs/bdistil_wordnet.py at small sizes: two rounds of text bags on token batches. Member 2 reads
    member 1's pooled `features`: the loaded ensemble gives the same logits whatever padding follows a row,
    its accuracy is the one ensemble.json reports, member 2's logits change without the connection, and the
    training forward passes a gradient into the connection (none if its input were zeroed or bypassed). FLOPs
    are averaged over the test rows at their length buckets."""
    config = _bdistil_config(text_teacher, data_dir)
    experiment.run_experiment(config, str(tmp_path))
    out = json.loads((tmp_path / "ensemble.json").read_text())
    b = out["variants"]["bdistil"]
    assert [m["connected"] for m in b["members"]] == [False, True] and b["members"][1]["prev_dim"] == 64
    ens, info = load(str(tmp_path), variant="bdistil")
    tokens, labels = runs.split_arrays(data.get_source("wordnet", "test[:400]", data_dir=data_dir), info)
    full = np.asarray(ens.member_logits(jnp.asarray(tokens)))
    lengths = (tokens != 0).sum(1)
    for bucket in text.BUCKETS:
        rows = (lengths <= bucket) & (lengths > bucket // 2 if bucket > 16 else True)
        if rows.any():
            cut = np.asarray(ens.member_logits(jnp.asarray(tokens[rows, :bucket])))
            np.testing.assert_allclose(cut, full[:, rows], atol=1e-4)
    acc = [float(np.mean(np.argmax(full[: w + 1].sum(0), -1) == labels)) for w in range(2)]
    assert acc == pytest.approx(b["accuracy_by_members"], abs=1.5 / len(labels))
    frozen1 = members.Ensemble([ens.members[0]], (False,), "features").frozen()
    _, prev = frozen1.apply(jnp.asarray(tokens))
    assert np.abs(np.asarray(ens.members[1](jnp.asarray(tokens))) - full[1]).max() > 1e-2
    np.testing.assert_allclose(ens.members[1](jnp.asarray(tokens), prev=prev), full[1], atol=1e-5)
    assert _connection_gradient(config, b["members"][1], frozen1, jnp.asarray(tokens[:64]), ens.members[1]) > 0
    buckets = members.length_buckets(tokens, 128)
    assert out["flops_buckets"] == {str(k): v for k, v in buckets.items()} and len(buckets) >= 2
    want = sum(n * models.flops_per_example(ens.members[0], (k,)) for k, n in buckets.items()) / len(tokens)
    assert b["cumulative_flops"][0] == pytest.approx(want, rel=1e-6)
    assert want < models.flops_per_example(ens.members[0], (128,))


def _student_gain(config, workdir, data_, rnd):
    """1 - margin over the whole pool of the student checkpointed after round `rnd` (margin's rounds), each row
    run padded to 128 tokens in one batch; and the pool rows bought by then."""
    cap = len(data_.labelled[1]) + config.active.rounds * config.active.budget_per_round
    trainer = StudentTrainer(config.student, data_.info, cap)
    abstract = trainer.abstract_variables()
    ck = checkpoint.TreeCheckpoints(str(workdir / "margin" / "rounds"))
    state = jax.tree.map(np.asarray, ck.restore(rnd, loop._fresh_state(config, data_, *abstract[:2])))
    ck.close()
    params, rest = loop._Rounds("margin", config, data_, trainer, None, abstract, state).student_variables()
    probs = jax.nn.softmax(nnx.merge(trainer.graphdef, params, rest)(jnp.asarray(data_.pool_images), train=False))
    return np.asarray(selection.informativeness(probs, "margin")), state["bought"]


def test_active_wordnet_config_runs_on_text_and_buys_the_rows_the_student_is_least_sure_of(
    data_dir, text_teacher, tmp_path
):
    """configs/active_wordnet.py at small sizes with the text teacher: every strategy buys token rows in
    rounds, the teacher runs only on bought and validation rows, and margin's second batch is the b pool rows
    not bought yet of least margin under the round-1 student, recomputed here at full padding in the pool's
    order: the selection reads each pool row's own scores (the student runs the pool sorted by length, in
    buckets)."""
    arg = (
        f"teacher_dir={text_teacher / 'teacher'},split=validation[:1000],eval_split=test[:300],labelled=128,"
        "validation=200,rounds=2,budget=100,steps=40,strategies=margin+kcenter+robust"
    )
    config = active_config.validate(load_config_file(f"{ROOT / 'configs' / 'active_wordnet.py'}:{arg}"))
    config.dataset.data_dir = data_dir
    out = loop.run_active(config, str(tmp_path), log=lambda s: None)
    assert out["dataset"] == "wordnet" and out["pool_size"] == 672
    # The teacher was evaluated on validation[:1000], not on this run's test split: its accuracy is named so.
    assert out["teacher"]["accuracy_split"] == "validation[:1000]" and out["teacher"]["test_accuracy"] is None
    from titans.active import report

    assert report.teacher_summary([out]).startswith("teacher validation[:1000] accuracy ")
    for name, r in out["strategies"].items():
        assert r["queries"] == [0, 100, 200] and all(0.0 < a <= 1.0 for a in r["accuracy"])
        assert r["teacher_rows_run_this_call"] == r["pool_queries"] + r["validation_queries"]
        assert r["validation_queries"] == (200 if name == "robust" else 0)
    assert out["strategies"]["robust"]["m"][1] > 0
    data_ = loop.load_data(config)
    gain, bought = _student_gain(config, tmp_path, data_, 1)
    _, after = _student_gain(config, tmp_path, data_, 2)
    assert np.array_equal(after[:100], bought[:100]) and bought[100] == -1
    available = np.setdiff1d(np.arange(len(gain)), bought[:100])
    threshold = np.sort(gain[available])[::-1][99]
    assert gain[after[100:200]].min() >= threshold - 1e-5 and len(set(after[100:200]) - set(available)) == 0
