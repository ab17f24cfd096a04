"""Tests for muxtune.tools.make_datasets (fast, stdlib only)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from muxtune.tools import make_datasets as md

DATA_DIR = Path(md.__file__).resolve().parent / "data"
NAMES = ["sentiment", "qa", "entailment", "instructions"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, Path]:
    return md.generate_all(tmp_path_factory.mktemp("gen0"), seed=0)


@pytest.fixture(scope="module")
def rows(generated) -> dict[str, list[dict]]:
    out = {}
    for name, path in generated.items():
        with open(path, encoding="utf-8") as f:
            out[name] = [json.loads(line) for line in f]
    return out


def test_returns_all_files(generated):
    assert sorted(generated) == sorted(NAMES)
    for name, path in generated.items():
        assert path.name == f"{name}.jsonl"
        assert path.is_file()
        assert path.stat().st_size < 300 * 1024


def test_deterministic(generated, tmp_path):
    again = md.generate_all(tmp_path / "again", seed=0)
    for name in NAMES:
        assert again[name].read_bytes() == generated[name].read_bytes(), name


def test_seed_changes_output(generated, tmp_path):
    other = md.generate_all(tmp_path / "s1", seed=1)
    assert any(other[n].read_bytes() != generated[n].read_bytes() for n in NAMES)


def test_shipped_files_match_seed0(generated):
    for name in NAMES:
        shipped = DATA_DIR / f"{name}.jsonl"
        assert shipped.is_file(), f"missing shipped dataset {shipped}"
        assert shipped.read_bytes() == generated[name].read_bytes(), (
            f"{shipped} is stale; regenerate with python -m muxtune.tools.make_datasets --out tools/data"
        )


def test_cli(tmp_path, generated):
    out = tmp_path / "cli"
    subprocess.run(
        [sys.executable, "-m", "muxtune.tools.make_datasets", "--out", str(out), "--seed", "0"],
        check=True,
        capture_output=True,
    )
    for name in NAMES:
        assert (out / f"{name}.jsonl").read_bytes() == generated[name].read_bytes()


def test_rows_well_formed(rows):
    expected_n = {name: n for name, (_, n, _) in md.DATASETS.items()}
    for name in NAMES:
        assert len(rows[name]) == expected_n[name]
        for r in rows[name]:
            assert set(r) == {"prompt", "completion"}
            assert isinstance(r["prompt"], str) and r["prompt"].strip()
            assert isinstance(r["completion"], str) and r["completion"].strip()
            assert r["completion"].startswith(" ")


def _label_counts(rs):
    return Counter(r["completion"] for r in rs)


@pytest.mark.parametrize(
    "name,labels",
    [("sentiment", {" positive", " negative"}), ("entailment", {" entailment", " contradiction"})],
)
def test_binary_labels_balanced(rows, name, labels):
    c = _label_counts(rows[name])
    assert set(c) == labels
    for lab in labels:
        assert 0.4 <= c[lab] / len(rows[name]) <= 0.6


def test_qa_labels_and_answer_in_context(rows):
    c = _label_counts(rows["qa"])
    assert set(c) == {" A", " B", " C", " D"}
    for lab in c:
        assert 0.15 <= c[lab] / len(rows["qa"]) <= 0.35
    for r in rows["qa"]:
        p = r["prompt"]
        assert p.endswith("\nAnswer:")
        text = p.split("\nText: ", 1)[1].split("\nQuestion: ", 1)[0]
        opts = dict(re.findall(r"^([ABCD])\. (.+)$", p, flags=re.M))
        assert sorted(opts) == ["A", "B", "C", "D"]
        in_text = [key for key, o in opts.items() if re.search(rf"\b{re.escape(o)}\b", text)]
        assert in_text == [r["completion"].strip()]


def test_sentiment_template(rows):
    for r in rows["sentiment"]:
        assert r["prompt"].startswith("Review: ")
        assert r["prompt"].endswith("\nSentiment:")


def test_entailment_rule(rows):
    for r in rows["entailment"]:
        p = r["prompt"]
        premise = p.split("\nPremise: ", 1)[1].split("\nHypothesis: ", 1)[0]
        hyp = p.split("\nHypothesis: ", 1)[1].split("\nAnswer:", 1)[0]
        sentences = set(re.findall(r"[^.]+\.", premise))
        sentences = {s.strip() for s in sentences}
        assert (hyp in sentences) == (r["completion"] == " entailment")


def test_instructions_exact(rows):
    kinds = Counter()
    for r in rows["instructions"]:
        head, inp, out = r["prompt"].split("\n")
        assert out == "Output:"
        items = inp.removeprefix("Input: ").split()
        ans = r["completion"].strip().split()
        if "Reverse" in head:
            assert ans == items[::-1]
        elif "uppercase" in head:
            assert ans == [w.upper() for w in items]
        elif "numbers" in head:
            assert ans == [str(v) for v in sorted(map(int, items))]
        elif "alphabetical" in head:
            assert ans == sorted(items)
        else:
            raise AssertionError(head)
        kinds[head] += 1
    assert len(kinds) == 4


def _mean_chars(rs):
    return sum(len(r["prompt"]) + len(r["completion"]) for r in rs) / len(rs)


def test_length_profiles(rows):
    assert _mean_chars(rows["sentiment"]) < _mean_chars(rows["qa"]) < _mean_chars(rows["entailment"])
    tok = {n: [md.approx_tokens(r["prompt"] + r["completion"]) for r in rows[n]] for n in NAMES}
    mean = {n: sum(t) / len(t) for n, t in tok.items()}
    assert 48 <= mean["sentiment"] <= 80
    assert 100 <= mean["qa"] <= 160
    assert 200 <= mean["entailment"] <= 310
    assert min(tok["instructions"]) >= 25 and max(tok["instructions"]) <= 210
    assert max(tok["instructions"]) - min(tok["instructions"]) >= 100
