"""Exercises, their solutions, and the classroom runner."""

import math
from pathlib import Path

import nbformat
import pytest

from helpers.classroom import init, run_class, table
from helpers.exercises import EXERCISES, check, results
from helpers.runfolder import RunFolder
from helpers.solutions import exercise_ids, load_answers, write_solutions
from helpers.steps import MODEL

NOTEBOOKS = sorted(Path(__file__).resolve().parent.parent.joinpath("notebooks").glob("*.ipynb"))


def test_every_lesson_has_an_exercise_with_a_solution_kept_apart():
    lessons = [p for p in NOTEBOOKS if p.stem[:2].isdigit()]
    ids = {p.stem: exercise_ids(p) for p in lessons}
    assert all(ids.values()), f"lessons without an exercise: {[k for k, v in ids.items() if not v]}"
    every = [e for found in ids.values() for e in found]
    assert set(every) == set(EXERCISES) == set(load_answers())
    for path in lessons:
        for cell in nbformat.read(path, as_version=4).cells:
            if "exercise" in cell.metadata.get("tags", []):
                assert cell.source.split("=")[1].strip().startswith("None"), (
                    f"{path.name}: a student copy holds an answer"
                )


def test_solution_copies_replace_only_the_answer_cells(tmp_path):
    written = write_solutions(tmp_path)
    assert len(written) == 10  # lessons 00-09
    for solved in written:
        student = nbformat.read(NOTEBOOKS[0].parent / solved.name, as_version=4)
        solution = nbformat.read(solved, as_version=4)
        changed = [
            i for i, (a, b) in enumerate(zip(student.cells, solution.cells, strict=True)) if a.source != b.source
        ]
        assert changed and all("exercise" in student.cells[i].metadata["tags"] for i in changed)
    with pytest.raises(KeyError, match="has no solution"):
        write_solutions(tmp_path / "x", {"01.1": "answer_01_1 = 1"})


def test_check_says_and_records_correct_wrong_and_unanswered(tmp_path, tokenizer):
    run = RunFolder(tmp_path, "cpu-smoke")
    right = len(tokenizer("What is a SYN flood?", add_special_tokens=False)["input_ids"])
    assert check(run, "01.1", right, tokenizer=tokenizer)
    wrong = check(run, "07.1", 2.0, loss=1.0)
    assert not wrong and "Hint: Perplexity is exp" in repr(wrong)
    assert check(run, "07.1", math.e + 1e-4, loss=1.0), "numbers are compared with the exercise's tolerance"
    unanswered = check(run, "05.1", None, history={"train": [(1, 2.0)]})
    assert not unanswered and "not answered yet" in repr(unanswered)
    assert results(run) == {"01.1": "correct", "05.1": "not answered", "07.1": "correct"}
    assert not check(run, "01.1", "eight", tokenizer=tokenizer)


def test_a_check_shows_a_sentence_never_a_bare_boolean(tmp_path, capsys):
    """The check cell's last line displays what check returns: a notebook shows its repr, which must read as a
    sentence that names the exercise and the answer variable, whatever the verdict."""
    from IPython.core.formatters import PlainTextFormatter

    run = RunFolder(tmp_path, "cpu-smoke")
    history = {"train": [(1, 3.0), (2, 2.0)]}
    shown = {
        verdict: PlainTextFormatter()(check(run, "05.1", answer, history=history))
        for verdict, answer in (("not answered", None), ("wrong", 1), ("correct", 2))
    }
    assert capsys.readouterr().out == "", "the sentence is the result, shown once, not printed as well"
    assert shown["not answered"] == (
        "Exercise 05.1: not answered yet. Write your answer in `answer_05_1` in the cell above, then run that cell "
        "and this one again."
    )
    assert shown["wrong"].startswith("Exercise 05.1: 1 is not the expected answer yet. Hint: history['train']")
    assert shown["correct"] == "Exercise 05.1: 2 is correct."
    assert all(text not in ("True", "False") and text.endswith(".") for text in shown.values())


def test_exercise_06_1_hint_names_the_helper_and_the_eos_id_the_notebook_uses():
    notebook = nbformat.read(NOTEBOOKS[0].parent / "06_infer.ipynb", as_version=4)
    task = next(c.source for c in notebook.cells if "Exercise 06.1" in c.source)
    hint = EXERCISES["06.1"].hint
    for words in ("eos_token_id=-1", "chat_inputs", "helpers.inference"):
        assert words in task and words in hint, words


def test_classroom_runs_each_learner_and_reports_failures(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLM_SCHOOL_RUNS", str(tmp_path / "runs"))
    made = init(tmp_path / "class", ["ada", "bob"])
    assert [p.name for p in made] == ["ada", "bob"] and len(list(made[0].glob("*.ipynb"))) == len(NOTEBOOKS)
    # ada answers exercise 01.1; bob breaks a cell of notebook 01
    path = made[0] / "01_load_model.ipynb"
    nb = nbformat.read(path, as_version=4)
    answer = next(c for c in nb.cells if c.metadata.get("exercise") == "01.1")
    answer.source = 'answer_01_1 = len(tokenizer("What is a SYN flood?", add_special_tokens=False)["input_ids"])'
    nbformat.write(nb, path)
    path = made[1] / "01_load_model.ipynb"
    nb = nbformat.read(path, as_version=4)
    broken = next(c for c in nb.cells if "model, tokenizer, card = load_model(profile)" in c.source)
    broken.source = "raise ValueError('bob was here')"
    nbformat.write(nb, path)
    assert init(tmp_path / "class", ["ada"]) == [], "an existing learner's work is never overwritten"

    outcome = run_class(tmp_path / "class", "cpu-smoke", only=["01"])
    by_name = {r.learner: r for r in outcome}
    assert by_name["ada"].failed == "" and results(by_name["ada"].run) == {"01.1": "correct"}
    assert "ValueError: bob was here" in by_name["bob"].failed and "01_load_model" in by_name["bob"].failed
    text = table(outcome)
    assert "| ada | 01 | 1/1 |" in text and "| bob | none | 0/0 |" in text
    assert by_name["ada"].run.require(MODEL)["profile"] == "cpu-smoke"
