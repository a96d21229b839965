"""Build the offline datasets shipped in ``treelora/data/files/`` from their sources.

Sources (nothing is downloaded by this script; install them first):

* WordNet 3.0 database files from Debian's ``wordnet-base`` package
  (``apt-get install -y --no-install-recommends wordnet-base``, files under ``/usr/share/wordnet``), and its
  licence from ``/usr/share/doc/wordnet-base/copyright``;
* scikit-learn's bundled copy of the UCI optical-recognition digits (``pip install scikit-learn``).

Outputs (all small: about 1 MB together):

* ``wordnet_supersense.tsv.gz``: one word per row, ``class, difficulty, split, lemma, tag_count, gloss``, for the
  32 supersenses of the stream, each with a fixed train/test split in two difficulties;
* ``wordnet_instruct.json.gz``: four relation tasks (supersense, hypernym, antonym, definition) as
  ``{"prompt", "answer", "options"}`` items with fixed train/eval/test splits;
* ``digits.npz``: the 1,797 8x8 digit images (uint8, values 0-16) and labels;
* ``WORDNET_LICENSE.txt`` and ``DIGITS_NOTICE.txt``: the notices that must ship with the data.

Usage: ``python scripts/build_data.py [--wordnet-dir /usr/share/wordnet] [--out treelora/data/files]``.
The output is deterministic (fixed seed, sorted inputs, gzip without timestamps), so rebuilding gives the same bytes.
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import io
import json
import random
import re
from pathlib import Path

from treelora.data.wordnet import MIN_TEST_PER_CLASS, MIN_TRAIN_PER_CLASS, SUPERSENSE_TASKS

# The 45 lexicographer file names, indexed by lex_filenum. They are not in any WordNet data file, only in the
# lexnames(5WN) manual page, hence the table.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
).split()
assert len(LEXNAMES) == 45

# Words kept per class and difficulty: up to 100 train + 40 test. Classes with fewer than 280 qualifying words (the
# smallest: verb.body with 146) let the two difficulties share words, never going below the stream's minimum of
# MIN_TRAIN_PER_CLASS + MIN_TEST_PER_CLASS (60 + 25) words per class. The supersenses of the stream's tasks
# (SUPERSENSE_TASKS) and those minimums come from treelora.data.wordnet, which reads the files built here.
TRAIN_PER_CLASS, TEST_PER_CLASS = 100, 40
# Items per instruct task: enough for ~100 steps of batch 4 without repeating, and a test set whose accuracy has
# a standard error of about 0.05 at 100 items.
INSTRUCT_SPLITS = {"train": 400, "eval": 50, "test": 100}
SEED = 20250610
POS_CODES = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}
SS_TYPE = {"1": "n", "2": "v", "3": "a", "4": "r", "5": "s"}


def _clean_lemma(word: str) -> str:
    """Strip the adjective marker ``(a)``/``(p)``/``(ip)`` and use spaces for underscores."""
    return re.sub(r"\([a-z]+\)$", "", word).replace("_", " ")


def _clean_gloss(gloss: str) -> str:
    """The definition part of a gloss: drop the quoted examples after the first ``; "``."""
    return gloss.split('; "')[0].strip().rstrip(";").strip()


def read_synsets(wordnet_dir: Path) -> dict[tuple[str, str], dict]:
    """All synsets keyed by (pos file, offset): lexname, words, pointers and gloss."""
    synsets = {}
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (wordnet_dir / f"data.{pos}").read_text(encoding="latin-1").splitlines():
            if line.startswith(" "):
                continue
            body, _, gloss = line.partition(" | ")
            f = body.split()
            offset, lex, n = f[0], int(f[1]), int(f[3], 16)
            words = [_clean_lemma(f[4 + 2 * i]) for i in range(n)]
            i = 4 + 2 * n
            p_cnt = int(f[i])
            pointers = []
            for k in range(p_cnt):
                sym, off, ppos, st = f[i + 1 + 4 * k : i + 5 + 4 * k]
                pointers.append((sym, POS_CODES[ppos], off, int(st[:2], 16), int(st[2:], 16)))
            synsets[(pos, offset)] = {
                "lexname": LEXNAMES[lex],
                "words": words,
                "pointers": pointers,
                "gloss": _clean_gloss(gloss),
            }
    return synsets


def read_tag_counts(wordnet_dir: Path) -> dict[tuple[str, str], int]:
    """Semantic-concordance tag counts per (lemma, pos), summed over senses (``cntlist.rev``)."""
    counts: dict[tuple[str, str], int] = collections.Counter()
    for line in (wordnet_dir / "cntlist.rev").read_text(encoding="latin-1").splitlines():
        key, _, cnt = line.split()
        lemma, _, rest = key.partition("%")
        pos = POS_CODES[SS_TYPE[rest[0]]]
        counts[(lemma.replace("_", " ").lower(), pos)] += int(cnt)
    return counts


def read_index(wordnet_dir: Path, pos: str) -> dict[str, list[str]]:
    """lemma -> synset offsets in WordNet's sense order (most frequent sense first)."""
    index = {}
    for line in (wordnet_dir / f"index.{pos}").read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue
        f = line.split()
        synset_cnt = int(f[2])
        index[f[0].replace("_", " ")] = f[-synset_cnt:]
    return index


def build_supersense(synsets: dict, counts: dict, indexes: dict) -> list[list[str]]:
    """Rows ``class, difficulty, split, lemma, tag_count, gloss`` for the stream's 32 supersenses.

    A word qualifies when it is a single lower-case alphabetic token whose every noun and verb sense lies in one
    supersense (so no word can belong to two classes). Its gloss is that of its most frequent sense. Per class, the
    ``common`` words are the most frequently tagged ones; the ``rare`` words are drawn at random from the rest (mostly
    never tagged); each difficulty is split into fixed train and test words.
    """
    senses: dict[str, set[str]] = collections.defaultdict(set)
    n_senses: dict[str, int] = collections.Counter()
    first_gloss: dict[str, str] = {}
    for pos in ("noun", "verb"):
        for lemma, offsets in indexes[pos].items():
            if not re.fullmatch(r"[a-z]{3,}", lemma):
                continue
            n_senses[lemma] += len(offsets)
            for off in offsets:
                senses[lemma].add(synsets[(pos, off)]["lexname"])
            first_gloss.setdefault(lemma, synsets[(pos, offsets[0])]["gloss"])
    # Frequency rank: tag count, then the number of senses (polysemous words are the familiar ones), then shorter
    # words first; without the last two keys the many never-tagged words would be ranked alphabetically.
    by_class: dict[str, list[tuple[int, int, int, str]]] = collections.defaultdict(list)
    for lemma, classes in senses.items():
        if len(classes) == 1:
            cls = next(iter(classes))
            count = counts.get((lemma, "noun"), 0) + counts.get((lemma, "verb"), 0)
            by_class[cls].append((count, n_senses[lemma], -len(lemma), lemma))
    single = sum(len(c) == 1 for c in senses.values())
    print(f"supersense: {len(senses)} single-word noun/verb lemmas, {single / len(senses):.1%} in one supersense")
    rng = random.Random(SEED)
    rows = []
    per = TRAIN_PER_CLASS + TEST_PER_CLASS
    for cls in sorted({c for task in SUPERSENSE_TASKS for c in task}):
        words = [(count, lemma) for count, _, _, lemma in sorted(by_class[cls], reverse=True)]
        n = min(per, len(words))
        needed = MIN_TRAIN_PER_CLASS + MIN_TEST_PER_CLASS
        if n < needed:
            raise SystemExit(f"{cls} has {len(words)} qualifying words, fewer than the {needed} needed")
        common = words[:n]
        # rare: drawn from the words outside the common ones when enough remain, else from the least-tagged words
        rest = words[per:] if len(words) - per >= n else words[-n:]
        rare = rng.sample(sorted(rest, key=lambda t: t[1]), n)
        n_test = min(TEST_PER_CLASS, n - MIN_TRAIN_PER_CLASS)
        for difficulty, pool in (("common", common), ("rare", rare)):
            pool = sorted(pool, key=lambda t: t[1])
            rng.shuffle(pool)
            for i, (count, lemma) in enumerate(pool):
                split = "train" if i < n - n_test else "test"
                rows.append([cls, difficulty, split, lemma, str(count), first_gloss[lemma]])
        print(
            f"  {cls:<20} {len(words):>6} words, {n - n_test} train + {n_test} test per difficulty, common tag "
            f"counts {common[-1][0]}..{common[0][0]}"
        )
    return rows


def _options(answer: str, pool: list[str], rng: random.Random, k: int = 4) -> list[str]:
    distractors = rng.sample([w for w in pool if w != answer], k - 1)
    options = [answer, *distractors]
    rng.shuffle(options)
    return options


def _mc_prompt(question: str, options: list[str]) -> str:
    letters = "ABCD"
    listed = " ".join(f"{letters[i]}) {o}" for i, o in enumerate(options))
    return f"{question}\nOptions: {listed}\nAnswer:"


def build_instruct(synsets: dict, supersense_rows: list[list[str]]) -> dict[str, dict[str, list[dict]]]:
    """Four relation tasks as 4-option multiple choice: supersense, hypernym, antonym, definition -> word."""
    rng = random.Random(SEED + 1)
    n_total = sum(INSTRUCT_SPLITS.values())
    tasks: dict[str, list[dict]] = {}

    # supersense: the word's class among the 4 classes of its supersense task (words from the common pool)
    items = []
    class_group = {c: group for group in SUPERSENSE_TASKS for c in group}
    for cls, difficulty, _, lemma, _, _ in supersense_rows:
        if difficulty != "common":
            continue
        names = [c.split(".")[1] for c in class_group[cls]]
        options = names[:]
        rng.shuffle(options)
        kind = "noun" if cls.startswith("noun") else "verb"
        question = f"Which category does the {kind} '{lemma}' belong to?"
        items.append({"prompt": _mc_prompt(question, options), "answer": cls.split(".")[1], "options": options})
    tasks["supersense"] = items

    # hypernym: a noun's direct hypernym (first word of the first hypernym synset of its first sense)
    single_nouns = {}
    for (pos, _), s in sorted(synsets.items()):
        if pos != "noun":
            continue
        for w in s["words"]:
            if re.fullmatch(r"[a-z]{3,}", w) and w not in single_nouns:
                single_nouns[w] = s
    items, pool = [], []
    for w, s in sorted(single_nouns.items()):
        hyper = [synsets[("noun", off)] for sym, ppos, off, _, _ in s["pointers"] if sym == "@" and ppos == "noun"]
        if not hyper:
            continue
        answer = hyper[0]["words"][0]
        if " " in answer or answer == w:
            continue
        pool.append(answer)
        items.append((w, answer))
    pool = sorted(set(pool))
    tasks["hypernym"] = [
        {"prompt": _mc_prompt(f"'{w}' is a kind of what?", opts), "answer": a, "options": opts}
        for w, a in items
        for opts in [_options(a, pool, rng)]
    ]

    # antonym: lexical antonym pointers between single-word lemmas (adjectives, nouns, verbs, adverbs)
    items, pool = [], collections.defaultdict(set)
    for (pos, _), s in sorted(synsets.items()):
        for sym, ppos, off, src, tgt in s["pointers"]:
            if sym != "!" or src == 0:
                continue
            word, other = s["words"][src - 1], synsets[(ppos, off)]["words"][tgt - 1]
            if re.fullmatch(r"[a-z]{3,}", word) and re.fullmatch(r"[a-z]{3,}", other):
                items.append((pos, word, other))
                pool[pos].add(other)
    seen = set()
    antonyms = []
    for pos, w, a in items:
        if (w, a) in seen:
            continue
        seen.add((w, a))
        opts = _options(a, sorted(pool[pos]), rng)
        antonyms.append({"prompt": _mc_prompt(f"What is the opposite of '{w}'?", opts), "answer": a, "options": opts})
    tasks["antonym"] = antonyms

    # definition -> word: the common supersense words, distractors from the same part of speech
    items = []
    words_by_kind = collections.defaultdict(list)
    for cls, difficulty, _, lemma, _, _ in supersense_rows:
        if difficulty == "common":
            words_by_kind[cls.split(".")[0]].append(lemma)
    for cls, difficulty, _, lemma, _, gloss in supersense_rows:
        if difficulty != "common":
            continue
        opts = _options(lemma, sorted(words_by_kind[cls.split(".")[0]]), rng)
        items.append({"prompt": _mc_prompt(f"Which word means: {gloss}?", opts), "answer": lemma, "options": opts})
    tasks["definition"] = items

    out = {}
    for name, task_items in tasks.items():
        if len(task_items) < n_total:
            raise SystemExit(f"instruct task {name} has {len(task_items)} items, fewer than {n_total}")
        chosen = rng.sample(task_items, n_total)
        splits, start = {}, 0
        for split, n in INSTRUCT_SPLITS.items():
            splits[split] = chosen[start : start + n]
            start += n
        out[name] = splits
        print(f"instruct: {name:<11} {len(task_items):>6} candidate items, kept {n_total}")
    return out


def _write_gzip(path: Path, data: bytes) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0, filename="") as f:
        f.write(data)
    path.write_bytes(buf.getvalue())


def build_digits(out: Path) -> None:
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.uint8)
    with open(out / "digits.npz", "wb") as f:
        np.savez_compressed(f, images=images, labels=d.target.astype(np.uint8))
    (out / "DIGITS_NOTICE.txt").write_text(
        "Optical Recognition of Handwritten Digits (8x8 version, 1,797 images), as bundled with scikit-learn\n"
        "(sklearn.datasets.load_digits, BSD-3-Clause). Original data: E. Alpaydin and C. Kaynak, UCI Machine\n"
        "Learning Repository, 1998, https://doi.org/10.24432/C50P49, licensed under CC BY 4.0.\n"
    )
    print(f"digits: {images.shape[0]} images of {images.shape[1]}x{images.shape[2]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--licence", type=Path, default=Path("/usr/share/doc/wordnet-base/copyright"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "treelora/data/files")
    args = parser.parse_args()
    if not (args.wordnet_dir / "data.noun").exists():
        raise SystemExit(
            f"no WordNet database in {args.wordnet_dir}: apt-get install -y --no-install-recommends wordnet-base"
        )
    args.out.mkdir(parents=True, exist_ok=True)

    synsets = read_synsets(args.wordnet_dir)
    counts = read_tag_counts(args.wordnet_dir)
    indexes = {pos: read_index(args.wordnet_dir, pos) for pos in ("noun", "verb")}
    rows = build_supersense(synsets, counts, indexes)
    text = io.StringIO()
    writer = csv.writer(text, delimiter="\t", lineterminator="\n")
    writer.writerow(["class", "difficulty", "split", "lemma", "tag_count", "gloss"])
    writer.writerows(rows)
    _write_gzip(args.out / "wordnet_supersense.tsv.gz", text.getvalue().encode())
    instruct = build_instruct(synsets, rows)
    _write_gzip(args.out / "wordnet_instruct.json.gz", json.dumps(instruct, sort_keys=True).encode())

    licence = args.licence.read_text()
    start = licence.index("License: WordNet3.0")
    end = licence.index("Files: debian/*")
    body = "\n".join(line[1:] if line.startswith(" ") else line for line in licence[start:end].splitlines()[1:])
    (args.out / "WORDNET_LICENSE.txt").write_text(
        "The files wordnet_supersense.tsv.gz and wordnet_instruct.json.gz are derived from WordNet 3.0\n"
        "(the lemmas, glosses, lexicographer files, semantic-concordance tag counts and relations of its database).\n\n"
        + body.replace("\n.\n", "\n\n").strip()
        + "\n"
    )
    build_digits(args.out)
    for f in sorted(args.out.iterdir()):
        print(f"wrote {f} ({f.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
