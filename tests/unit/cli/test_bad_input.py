"""Bad input, as a new user types it: every case exits with status 2, prints one `error:` line and no traceback, and
leaves nothing behind (the folder it ran in is as it was). Runs `compactlm`'s real entry point in-process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from compactlm.cli.root import main


def _write(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


@pytest.fixture
def place(retrain_checkpoints, tmp_path) -> dict:
    """A folder with a tiny teacher (tokenizer, 128 positions), its pruned student, a corpus and bad files."""
    work = tmp_path / "work"
    work.mkdir()
    recipe = {
        "name": "tiny",
        "teacher": str(retrain_checkpoints["teacher"]),
        "data": str(retrain_checkpoints["corpus"]),
        "correction": {"tokens": 64, "seq_len": 16, "batch_size": 2},
        "importance": {"samples": 4, "seq_len": 16},
        "students": {"small": {"num_layers": 2}},
        "distill": {"tokens": 64, "seq_len": 16, "batch_size": 2, "top_k": 8},
        "evaluate": {"samples": 2, "seq_len": 16, "tasks": []},
        "engines": {"backend": "torch", "precisions": ["fp32"]},
        "sweep": {"shapes": [[8, 4]], "batch_sizes": [1], "requests": 2, "warmup": 0},
    }
    files = {
        "recipe": _write(work, "recipe.yaml", yaml.safe_dump(recipe)),
        "binary": _write(work, "random.bin", bytes(range(256)) * 64),
        "empty": _write(work, "empty.txt", ""),
        "broken_yaml": _write(work, "broken.yaml", "a: [1, 2\n"),
        "parquet": _write(work, "fake.parquet", b"PAR1 not really"),
    }
    import pandas as pd

    pd.DataFrame({"x": [1, 2]}).to_parquet(work / "other.parquet")
    (work / "not-an-engine").mkdir()
    _write(work / "not-an-engine", "notes.txt", "mine")
    return {"work": work, **retrain_checkpoints, **files}


def _recipe_with(place, **changes) -> str:
    recipe = yaml.safe_load(place["recipe"].read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        target = recipe
        for p in parents:
            target = target.setdefault(p, {})
        target[last] = value
    return str(_write(place["work"], "changed.yaml", yaml.safe_dump(recipe)))


DISTILL = "compress distill --teacher {teacher} --student {student} --out {work}/d"
CASES = {  # command lines, split on spaces; {work}, {teacher}, ... are the fixture's paths
    # the main job
    "run: no such recipe": "run {work}/nope.yaml",
    "run: recipe not YAML": "run {broken_yaml}",
    "run: recipe is binary": "run {binary}",
    "run: recipe is a folder": "run {work}",
    "run: --set without =": "run {recipe} --set distill.tokens",
    "run: --set broken value": "run {recipe} --set sweep.batch_sizes=[1",
    "run: --set unknown key": "run {recipe} --set distill.tokenz=3",
    "run: --set wrong type": "run {recipe} --set distill.lr=fast",
    "run: unknown budget": "run {recipe} --budget huge",
    "run: impossible student": "run {recipe} --set students.small.hidden_size=4096 --out {work}/r",
    "run: dry run of an impossible student": "run {recipe} --set students.small.num_layers=9 --dry-run",
    "run: eval beyond positions": "run {recipe} --set evaluate.seq_len=4096 --out {work}/r",
    "run: sweep beyond positions": "run {recipe} --set sweep.shapes=[[100, 100]] --out {work}/r",
    "run: someone's folder": "run {recipe} --out {work}/not-an-engine",
    "run: teacher cache with hidden loss": "run {recipe} --set distill.loss=logit+hidden",
    # models
    "models pull: unknown": "models pull gpt-17",
    # importance
    "importance: no such model": "compress importance {work}/no-model --out {work}/s.safetensors",
    "importance: binary data": "compress importance {teacher} --out {work}/s.st --data {binary} --seq-len 16",
    "importance: empty data": "compress importance {teacher} --out {work}/s.st --data {empty} --seq-len 16",
    "importance: beyond positions": "compress importance {teacher} --out {work}/s.st --data {corpus} --seq-len 999",
    "importance: bad block sizes": "compress importance {teacher} --out {work}/s.st --block-sizes a,b",
    "importance: bad aggregation": "compress importance {teacher} --out {work}/s.st --seq-agg median",
    "importance: existing out": "compress importance {teacher} --out {recipe}",
    # prune
    "prune: no target": "compress prune {teacher} {work}/p",
    "prune: larger than the model": "compress prune {teacher} {work}/p --hidden-size 4096",
    "prune: unreadable layer list": "compress prune {teacher} {work}/p --drop-layers x-y",
    "prune: layers two ways": "compress prune {teacher} {work}/p --num-layers 2 --drop-layers 1",
    "prune: no such scores": "compress prune {teacher} {work}/p --num-layers 2 --scores {work}/none.st",
    "prune: garbage scores": "compress prune {teacher} {work}/p --num-layers 2 --scores {binary}",
    "prune: heads across groups": "compress prune {teacher} {work}/p --num-attention-heads 5",
    "prune: negative size": "compress prune {teacher} {work}/p --ffn-hidden-size -3",
    "prune: binary data": "compress prune {teacher} {work}/p --num-layers 2 --data {binary} --seq-len 16",
    # eval
    "eval: bad --out": "compress eval {teacher} --out {work}/t.txt",
    "eval: unknown task": "compress eval {teacher} --tasks trivia",
    "eval: task limit 0": "compress eval {teacher} --task-limit 0",
    "eval: beyond positions": "compress eval {teacher} --data {corpus} --seq-len 4096",
    "eval: no such model": "compress eval {work}/nope",
    # retraining
    "distill: no teacher": "compress distill --student {student} --out {work}/d --steps 1",
    "distill: no length": f"{DISTILL}",
    "distill: two lengths": f"{DISTILL} --steps 1 --tokens 9",
    "distill: no such config": "compress distill --config {work}/none.yaml",
    "distill: config not YAML": "compress distill --config {broken_yaml}",
    "distill: config unknown key": "compress distill --config {recipe}",
    "distill: lr 0": f"{DISTILL} --steps 1 --lr 0",
    "distill: unknown loss": f"{DISTILL} --steps 1 --loss kl",
    "distill: too many held-out samples": f"{DISTILL} --data {{corpus}} --steps 1 --seq-len 16 --eval-samples 100000",
    "distill: beyond positions": f"{DISTILL} --data {{corpus}} --steps 1 --seq-len 4096",
    "distill: binary data": f"{DISTILL} --data {{binary}} --steps 1 --seq-len 16",
    "correct-teacher: no length": "compress correct-teacher {teacher} --out {work}/c",
    "correct-teacher: bad precision": "compress correct-teacher {teacher} --out {work}/c --steps 1 --precision fp16",
    "correct-teacher: beyond positions": "compress correct-teacher {teacher} --out {work}/c --steps 1 --seq-len 100000",
    "cache-logits: no length": "compress cache-logits {teacher} --out {work}/cache",
    "distill: mix weights sum to 0": f"{DISTILL} --data python-docs:0,linux-docs:0 --steps 1 --seq-len 16",
    "distill: unknown corpus in a mix": f"{DISTILL} --data {{corpus}}:1,no-such-corpus:1 --steps 1 --seq-len 16",
    "distill: a weight not a number": f"{DISTILL} --data {{corpus}}:lots --steps 1 --seq-len 16",
    "distill: on the held-out English": f"{DISTILL} --data english --steps 1 --seq-len 16",
    "run: a mix whose weights sum to 0": "run {recipe} --set distill.data=python-docs:0 --out {work}/r",
    "run: generation too small for its share": "run {recipe} --set distill.data=generated --set generate.tokens=64 "
    "--out {work}/r",
    "run: generated text named, none made": "run {recipe} --set distill.data={corpus}:1,generated:1 --out {work}/r",
    "run: generation nobody reads": "run {recipe} --set generate.tokens=4096 --out {work}/r",
    "generate-data: budget 0": "compress generate-data {teacher} {work}/g --tokens 0",
    "generate-data: no such prompts": "compress generate-data {teacher} {work}/g --prompts {work}/none.txt",
    "generate-data: binary prompts": "compress generate-data {teacher} {work}/g --prompts {binary}",
    "generate-data: existing out": "compress generate-data {teacher} {work}/not-an-engine",
    "eval: general text is binary": "compress eval {teacher} --data {corpus} --seq-len 16 --general {binary}",
    # search, chains, quantization
    "search: 200%": "compress search {teacher} --out {work}/s --params 200%",
    "search: unreadable budget": "compress search {teacher} --out {work}/s --params half",
    "search: tolerance not a fraction": "compress search {teacher} --out {work}/s --params 50% --tolerance 2",
    "search: unknown axis": "compress search {teacher} --out {work}/s --params 50% --axes depht",
    "search: unknown ranking": "compress search {teacher} --out {work}/s --params 50% --rank-by speed",
    "chain: no such file": "compress chain {work}/none.yaml",
    "chain: a job recipe": "compress chain {recipe} --out {work}/c",
    "chain: not YAML": "compress chain {broken_yaml} --out {work}/c",
    "quantize: unknown format": "compress quantize {teacher} {work}/q --format fp4",
    # engines
    "build: unknown backend": "engines build {teacher} {work}/e --backend nope",
    "build: unknown precision": "engines build {teacher} {work}/e --backend torch --precision fp64",
    "build: beyond positions": "engines build {teacher} {work}/e --backend torch --max-seq-len 4096",
    "build: no such model": "engines build {work}/nope {work}/e",
    "build: no such draft": "engines build {teacher} {work}/e --max-seq-len 128 --draft {work}/nope",
    "build: draft tokens 0": "engines build {teacher} {work}/e --max-seq-len 128 --draft {student} --draft-tokens 0",
    "build: draft on torch": "engines build {teacher} {work}/e --backend torch --max-seq-len 128 --draft {student}",
    "info: not an engine": "engines info {work}/not-an-engine",
    "generate: no such engine": "engines generate {work}/nope -p hi",
    # bench
    "measure: binary dataset": "bench measure null --dataset {binary} --out {work}/r.csv",
    "measure: zero requests": "bench measure null --requests 0 --out {work}/r.csv",
    "measure: two loads": "bench measure null --offline --rate 1 --out {work}/r.csv",
    "measure: bad results file": "bench measure null --out {work}/r.txt",
    "sweep: unknown key": "bench sweep {recipe}",
    "sweep: no such file": "bench sweep {work}/none.yaml",
    "report: random bytes": "bench report {parquet} --out {work}/rep",
    "report: not a results table": "bench report {work}/other.parquet --out {work}/rep",
    "dataset: zero requests": "bench dataset {work}/set.jsonl --requests 0 --vocab-size 100",
    # serving
    "serve: no such engine": "serve {work}/nope",
    "serve: draft tokens 99": "serve {work}/nope --draft-tokens 99",
    "serve: not an engine": "serve {work}/not-an-engine",
    "triton-repo: not an engine": "serve triton-repo {work}/not-an-engine {work}/repo",
}


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, place, monkeypatch, capsys):
    args = [a.format(**{k: str(v) for k, v in place.items()}) for a in CASES[case].split()]
    work, before = place["work"], _tree(place["work"])
    models = {k: _tree(place[k]) for k in ("teacher", "student")}
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["compactlm", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_.value.code == 2, err
    assert "Traceback" not in err and lines, err
    assert lines[-1].startswith("error:") or "Usage:" in err or "Error" in err, err
    if lines[-1].startswith("error:"):
        assert len(lines) == 1, err  # one line, whatever came before (a progress bar) aside
    assert _tree(work) == before, "the bad command left something behind"
    assert {k: _tree(place[k]) for k in ("teacher", "student")} == models


def test_the_suite_covers_every_command_group():
    commands = [line.split() for line in CASES.values()]
    groups = {
        tuple(a[:2]) if a[0] in ("compress", "engines", "bench", "models", "serve") else (a[0],) for a in commands
    }
    assert len(CASES) >= 60
    assert {
        ("run",),
        ("compress", "prune"),
        ("compress", "distill"),
        ("engines", "build"),
        ("bench", "measure"),
    } <= groups
    assert json.dumps(sorted(CASES))  # names are plain text
