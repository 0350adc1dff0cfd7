import pyarrow as pa

from pipeline.data.subsample import subsample
from tests.helpers import source_rows, table


def split_tables() -> tuple[pa.Table, pa.Table]:
    train = source_rows(40, 3) + source_rows(10, 2, site="superuser")
    # Eval shares questions 0-4 (same URL) with train, and qid 7 of another site (other URL).
    evaluation = (
        source_rows(20, 3, start=100)
        + source_rows(5, 2)
        + source_rows(1, 2, site="askubuntu", start=7)
    )
    return table(train), table(evaluation)


def test_no_question_in_both_splits() -> None:
    train, evaluation = split_tables()
    sampled_train, sampled_eval, counts = subsample(train, evaluation, 1.0, len(train), 1000, 0)
    assert not set(sampled_train["question_id"].to_pylist()) & set(
        sampled_eval["question_id"].to_pylist()
    )
    assert (
        counts["train_removed_eval_overlap"] == 15
    )  # questions 0-4 of stackoverflow, 3 pairs each
    # qid 7 of askubuntu is another question than qid 7 of stackoverflow: that one stays in train.
    assert "https://stackoverflow.com/questions/7" in set(sampled_train["question_id"].to_pylist())


def test_subsample_is_deterministic_for_a_seed() -> None:
    train, evaluation = split_tables()
    first = subsample(train, evaluation, 0.5, len(train), 20, seed=3)
    again = subsample(train, evaluation, 0.5, len(train), 20, seed=3)
    other = subsample(train, evaluation, 0.5, len(train), 20, seed=4)
    assert first[0].equals(again[0]) and first[1].equals(again[1]) and first[2] == again[2]
    assert not first[0].equals(other[0])


def test_fraction_applies_to_the_source_train_rows() -> None:
    train, evaluation = split_tables()
    sampled, _, counts = subsample(train, evaluation, 0.1, 1000, 20, seed=0)
    assert counts["train_target"] == 100 and len(sampled) == 100
    small, _, _ = subsample(train, evaluation, 0.01, len(train), 20, seed=0)
    assert len(small) == 2  # ceil(0.01 * 140)


def test_eval_keeps_whole_questions_until_eval_size() -> None:
    train, evaluation = split_tables()
    _, sampled_eval, counts = subsample(train, evaluation, 1.0, len(train), 10, seed=1)
    assert 10 <= len(sampled_eval) < 13  # whole questions of 2-3 pairs: at most one over
    per_question = {}
    for row in sampled_eval.to_pylist():
        per_question[row["question_id"]] = per_question.get(row["question_id"], 0) + 1
    source_counts = {}
    for row in evaluation.to_pylist():
        key = row["metadata"][0]
        source_counts[key] = source_counts.get(key, 0) + 1
    assert all(per_question[q] == source_counts[q] for q in per_question)
    assert counts["eval_questions"] == len(per_question)


def test_pair_ids_are_unique_within_a_split() -> None:
    train, evaluation = split_tables()
    sampled_train, sampled_eval, _ = subsample(train, evaluation, 1.0, len(train), 1000, 0)
    for split in (sampled_train, sampled_eval):
        ids = split["pair_id"].to_pylist()
        assert len(ids) == len(set(ids))
