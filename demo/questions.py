"""The demo's questions and answers, written by a seeded program: topics in several languages and
sites, 2-6 answers per question in six graded quality levels (wording from texts.yaml beside this
file), each with a distinct vote score. demo/dataset.py pairs them and lays them out as the hub
does."""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import yaml

OFF_TOPIC_SHARE = 0.5  # of level-1 answers: a good answer to another question


# Weights of 2..6 answers per question: most questions have >= 3 answers, so per-question
# rankings (Kendall's tau) are meaningful, while two-answer questions still occur.
ANSWER_COUNT_WEIGHTS = {2: 0.2, 3: 0.25, 4: 0.25, 5: 0.15, 6: 0.15}


TEXTS_FILE = Path(__file__).with_name("texts.yaml")


@dataclasses.dataclass(frozen=True)
class Topic:
    """What a question asks and the on-topic material a good answer is made of."""

    task: str  # verb phrase: "reverse a list"
    language: str  # display name; the fence tag is LANGUAGES[language]
    api: str  # the tool that solves it, shown as inline code
    code: str  # a short working snippet
    reason: str  # why the snippet works
    pitfall: str  # a detail an expert would add, as a sentence without its full stop


def _load_texts() -> dict[str, Any]:
    """The wording tables of texts.yaml, as the generator reads them (tuples, Topic records)."""
    texts = yaml.safe_load(TEXTS_FILE.read_text(encoding="utf-8"))
    return {
        "languages": {k: (v["fence"], tuple(v["sites"])) for k, v in texts["languages"].items()},
        "topics": tuple(Topic(**t) for t in texts["topics"]),
        "openers": {int(k): tuple(v) for k, v in texts["openers"].items()},
        **{k: tuple(v) for k, v in texts.items() if k not in ("languages", "topics", "openers")},
    }


_TEXTS = _load_texts()


# Display name -> (code fence tag, sites where such questions are asked).
LANGUAGES: dict[str, tuple[str, tuple[str, ...]]] = _TEXTS["languages"]


TOPICS: tuple[Topic, ...] = _TEXTS["topics"]


# Question wording: a title plus one to three body sentences and a closing.
TITLES, CONTEXTS, CLOSINGS = _TEXTS["titles"], _TEXTS["contexts"], _TEXTS["closings"]


ATTEMPTS, PROBLEMS = _TEXTS["attempts"], _TEXTS["problems"]


# Answer wording, one vocabulary per quality level (5 best .. 0 worst), so quality shows in
# consistent surface features a tiny model can pick up, as votes reward style in the real data.
OPENERS: dict[int, tuple[str, ...]] = _TEXTS["openers"]


NOTES = _TEXTS["notes"]  # level 5's bullet list


HEDGES = _TEXTS["hedges"]  # level 3 and 2: uncertain, untested


RAMBLES = _TEXTS["rambles"]  # level 1: off-topic stories


DISMISSALS = _TEXTS["dismissals"]  # level 0: rude, unhelpful


@dataclasses.dataclass(frozen=True)
class Answer:
    text: str
    level: int  # style quality, 0 (worst) .. 5 (best)
    score: int  # votes: what the pairing rule compares (distinct within a question)
    url: str


@dataclasses.dataclass(frozen=True)
class Question:
    site: str
    qid: int  # unique only within `site`
    url: str  # the question's identity
    date: str
    text: str
    answers: tuple[Answer, ...]


def _question_text(rng: random.Random, topic: Topic) -> str:
    """Title, up to three body sentences and a closing: roughly 10-60 words."""
    fill = {"task": topic.task, "language": topic.language}
    title = rng.choice(TITLES).format(**fill)
    body = [s.format(**fill) for s in rng.sample(CONTEXTS, rng.randint(0, 2))]
    if rng.random() < 0.8:
        body.append(f"I tried {rng.choice(ATTEMPTS)} but {rng.choice(PROBLEMS)}.")
    body.append(rng.choice(CLOSINGS))
    return f"{title}\n\n{' '.join(body)}"


def _fence(topic: Topic) -> str:
    return f"```{LANGUAGES[topic.language][0]}\n{topic.code}\n```"


def _key_line(code: str) -> str:
    """The snippet's most telling line for inline code: the longest that is not an import."""
    lines = [line.strip() for line in code.splitlines()]
    return max((line for line in lines if not line.startswith(("import ", "from "))), key=len)


def _answer_text(rng: random.Random, level: int, topic: Topic) -> str:
    """Markdown answer of quality `level`: features accumulate with the level (20-110 words)."""
    if level == 1 and rng.random() < OFF_TOPIC_SHARE:
        # A good answer to a different question: its words alone look fine, so only a model that
        # reads the question ranks it low (a bag-of-words preference gets these pairs wrong).
        return _answer_text(rng, 4, rng.choice([t for t in TOPICS if t != topic]))
    fill = {"api": f"`{topic.api}`", "language": topic.language, "pitfall": topic.pitfall}
    opener = rng.choice(OPENERS[level]).format(**fill)
    if level == 5:
        notes = "\n".join(f"- {n.format(**fill)}" for n in rng.sample(NOTES, 3))
        return (
            f"{opener}\n\n{_fence(topic)}\n\nThis works because {topic.reason}. "
            f"A few details worth knowing:\n\n{notes}"
        )
    if level == 4:
        extra = f" {topic.pitfall}." if rng.random() < 0.5 else ""
        return f"{opener}\n\n{_fence(topic)}\n\nIt works because {topic.reason}.{extra}"
    if level == 3:
        return f"{opener} Something like `{_key_line(topic.code)}` might do it. " + " ".join(
            rng.sample(HEDGES, 2)
        )
    if level == 2:
        return f"{opener} " + " ".join(rng.sample(HEDGES, 2)) + " Good luck with it."
    if level == 1:
        fix = "\n\n```bash\nsudo reboot\n```\n\n" if rng.random() < 0.5 else " "
        return f"{opener}{fix}" + " ".join(rng.sample(RAMBLES, 2))
    return f"{opener} " + " ".join(rng.sample(DISMISSALS, 3))


def _scores(rng: random.Random, count: int, label_noise: float) -> list[int]:
    """Distinct vote scores, best level first; with probability `label_noise` two neighbours swap.

    Real votes sometimes rank a worse answer higher; swapping neighbours flips exactly one pair,
    so the preference stays learnable while a perfect held-out score stays out of reach.
    """
    scores = sorted(rng.sample(range(-5, 60), count), reverse=True)
    if count > 1 and rng.random() < label_noise:
        i = rng.randrange(count - 1)
        scores[i], scores[i + 1] = scores[i + 1], scores[i]
    return scores


def _make_question(
    rng: random.Random,
    site: str,
    qid: int,
    topic: Topic,
    label_noise: float,
    answer_ids: Iterator[int],
) -> Question:
    """One question with 2-6 answers of distinct levels and distinct vote scores."""
    count = rng.choices(list(ANSWER_COUNT_WEIGHTS), weights=list(ANSWER_COUNT_WEIGHTS.values()))[0]
    levels = sorted(rng.sample(range(6), count), reverse=True)
    scores = _scores(rng, count, label_noise)
    answers = tuple(
        Answer(
            _answer_text(rng, level, topic), level, score, f"https://{site}/a/{next(answer_ids)}"
        )
        for level, score in zip(levels, scores, strict=True)
    )
    date = f"{rng.randint(2009, 2023)}/{rng.randint(1, 12):02d}/{rng.randint(1, 28):02d}"
    url = f"https://{site}/questions/{qid}"
    return Question(site, qid, url, date, _question_text(rng, topic), answers)


def generate_questions(
    seed: int | str,
    count: int,
    label_noise: float = 0.1,
    taken: Collection[str] = frozenset(),
    first_answer_id: int = 100_000,
) -> list[Question]:
    """`count` questions with their answers. qids are unique per site and collide across sites.

    Every site draws qids from the same small range, as real sites' ids overlap: a question's
    identity must be its URL, never its qid alone. `taken` question URLs (another folder's) are
    never reused; answer ids count up from `first_answer_id`, so a second call can keep every
    answer URL unique too.
    """
    rng = random.Random(seed)
    used = set(taken)
    answer_ids = itertools.count(first_answer_id)
    questions = []
    for _ in range(count):
        topic = rng.choice(TOPICS)
        site = rng.choice(LANGUAGES[topic.language][1])
        qid = rng.randrange(1_000, 1_000 + 2 * count)
        while f"https://{site}/questions/{qid}" in used:
            qid = rng.randrange(1_000, 1_000 + 2 * count)
        used.add(f"https://{site}/questions/{qid}")
        questions.append(_make_question(rng, site, qid, topic, label_noise, answer_ids))
    return questions
