"""The output check of issue 26 item 7: each rule fires on a crafted notebook and stays quiet on clean outputs; the
smoke chain's executed notebooks pass it."""

import uuid
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output
from notebook_outputs import (
    BARE_BOOLEAN,
    LONG_FLOAT,
    MACHINE_PATH,
    TOKEN_URL,
    TRACEBACK,
    WARNING,
    default_machine_paths,
    folder_offences,
    notebook_offences,
    report,
)

from helpers.runfolder import RunFolder
from helpers.steps import CHAIN, executed_dir

PROJECT = "/data/school/project"  # this made-up machine's project root, given to the check as the real one is


def stream(text: str, name: str = "stdout"):
    return new_output("stream", name=name, text=text)


def result(data: dict, kind: str = "execute_result"):
    return new_output(kind, data=data, **({"execution_count": 1} if kind == "execute_result" else {}))


def table(*cells: str) -> str:
    rows = "".join(f"<tr><th>{i}</th><td>{c}</td></tr>" for i, c in enumerate(cells))
    return f'<style>.x {{ width: 0.123456px }}</style><table class="dataframe"><tbody>{rows}</tbody></table>'


def write(tmp_path: Path, *outputs, name: str = "05_demo.ipynb", widgets: dict | None = None) -> Path:
    """A notebook as papermill leaves it: markdown, parameters, injected parameters, then the cell under test."""
    nb = new_notebook()
    parameters = new_code_cell('PROFILE = "cpu-lab"', metadata={"tags": ["parameters"]})
    injected = new_code_cell('PROFILE = "cpu-smoke"', metadata={"tags": ["injected-parameters"]})
    cell = new_code_cell("value = compute()\nshow(value)", outputs=list(outputs), execution_count=1)
    nb.cells = [new_markdown_cell("# demo"), parameters, injected, cell]
    if widgets is not None:
        nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": widgets, "version_major": 2}}
    path = tmp_path / name
    nbformat.write(nb, path)
    return path


def offences(path: Path):
    return notebook_offences(path, [PROJECT])


FAKE = uuid.uuid4().hex  # a made-up token value, never a real one


@pytest.mark.parametrize(
    ("output", "rule", "shown"),
    [
        (new_output("error", ename="ValueError", evalue="bad row 3", traceback=["Traceback ...", "ValueError"]),
         TRACEBACK, "ValueError: bad row 3"),
        (stream("Traceback (most recent call last):\n  File x\nKeyError: 'loss'\n", "stderr"), TRACEBACK, "KeyError"),
        (stream("x.py:3: FutureWarning: `dtype` is deprecated\n  warnings.warn(\n", "stderr"), WARNING,
         "FutureWarning: `dtype` is deprecated"),
        (stream("Failed to load CPU gemm_4bit_forward: No module named 'kernels'\n", "stderr"), WARNING,
         "Failed to load CPU gemm_4bit_forward"),
        (stream("UserWarning: padding side is right\n"), WARNING, "UserWarning: padding side"),
        (result({"text/plain": "False"}), BARE_BOOLEAN, "False"),
        (result({"text/plain": "True"}, "display_data"), BARE_BOOLEAN, "True"),
        (stream("step saved in /tmp/r0/t0/01_model\n"), MACHINE_PATH, "/tmp/r0/t0/01_model"),
        (stream("model from /home/ana/.cache/model\n"), MACHINE_PATH, "/home/ana/.cache/model"),
        (stream("run folder: /root/runs/lab\n"), MACHINE_PATH, "/root/runs/lab"),
        (stream("data: C:\\Users\\ana\\rows.jsonl\n"), MACHINE_PATH, "C:\\Users\\ana\\rows.jsonl"),
        (result({"text/plain": "x", "text/html": f"<td>{PROJECT}/.cache/SmolLM2</td>"}), MACHINE_PATH,
         f"{PROJECT}/.cache/SmolLM2"),
        (result({"text/plain": f"{{'source': '{PROJECT}'}}"}), MACHINE_PATH, PROJECT),
        (result({"text/plain": "<IPython.core.display.HTML object>",
                 "text/html": f'<iframe src="http://127.0.0.1:7860/?project=lab&amp;write_token={FAKE}"></iframe>'},
                "display_data"), TOKEN_URL, "http://127.0.0.1:7860/?project=lab&write_token=<hidden>"),
        (stream(f"open https://example.org/d?token={FAKE}\n"), TOKEN_URL, "https://example.org/d?token=<hidden>"),
        (stream(f"GET /v1/models?key={FAKE}&x=1\n"), TOKEN_URL, "/v1/models?key=<hidden>&x=1"),
        (result({"text/plain": "x", "text/html": table("3.966204", "0.3002")}), LONG_FLOAT, "3.966204"),
        (result({"text/plain": "x", "text/html": table("1.234567e-05")}), LONG_FLOAT, "1.234567e-05"),
        (result({"text/plain": "       loss\nbase  -15.96889365776054", "text/html": table("-15.969")}),
         LONG_FLOAT, "-15.96889365776054"),
    ],
)  # fmt: skip
def test_each_rule_fires_and_names_notebook_cell_and_text(tmp_path, output, rule, shown):
    found = offences(write(tmp_path, output))
    assert [o.rule for o in found] == [rule], report(found)
    message = str(found[0])
    assert message.startswith("05_demo.ipynb cell 2 `show(value)`: "), message  # injected cell not counted
    assert shown in message, message
    assert FAKE not in message, "a token's value must never be printed, not even by the check"


CLEAN = [
    stream("kept 2 pairs; dropped: none\n[24 tokens in 0.91 s, stopped by itself: False]\n"),
    stream("chunks: 100%|██████████| 2/2 [00:01<00:00,  1.9chunk/s]\n", "stderr"),
    stream("saved runs/t0/08_export; data/white_rabbit_sample.jsonl; ./model-q8_0.gguf; https://example.org/home/x\n"),
    stream("OpenAI-compatible API at http://127.0.0.1:37687/v1?model=white-rabbit&stream=true\n"),
    stream("step 1 loss 4.016852 (a printed line, not a table)\n"),
    stream("profile: the tokenizer (root or administrator rights are not needed); and/or /tmpfile-like words\n"),
    result({"text/plain": "42"}),
    result({"text/plain": "(True, False)"}),
    result({"text/plain": "loss  3.9276\nppl  50.7862", "text/html": table("3.9276", "50.7862", "519.0", "False")}),
    result({"text/plain": "<pandas.io.formats.style.Styler at 0x7fab9d1ccc10>", "text/html": table("0.1")}),
    result({"text/plain": "LlamaRMSNorm((576,), eps=9.999999747378752e-06)"}),
    result({"text/plain": "VBox(...)", "application/vnd.jupyter.widget-view+json": {"model_id": "a1"}}),
]


def test_clean_outputs_pass(tmp_path):
    widgets = {"a1": {"state": {"children": ["IPY_MODEL_b2"], "value": "row 1"}}, "b2": {"state": {"value": "ok"}}}
    found = offences(write(tmp_path, *CLEAN, widgets=widgets))
    assert not found, report(found)


def test_the_project_root_is_a_machine_path_only_when_given(tmp_path):
    path = write(tmp_path, stream(f"data: {PROJECT}/data/raw\n"))
    assert notebook_offences(path, []) == []
    assert [o.text for o in notebook_offences(path, [PROJECT])] == [f"{PROJECT}/data/raw"]


def test_a_widget_shows_what_it_holds(tmp_path):
    """A cell that displays a widget shows its saved state: a path in a child widget is caught."""
    view = result({"text/plain": "VBox(...)", "application/vnd.jupyter.widget-view+json": {"model_id": "a1"}})
    widgets = {
        "a1": {"state": {"children": ["IPY_MODEL_b2"]}},
        "b2": {"state": {"value": "<b>where</b>: /tmp/rows.jsonl, line 1"}},
        "c3": {"state": {"value": "/tmp/not/displayed/by/this/cell"}},
    }
    found = offences(write(tmp_path, view, widgets=widgets))
    assert [(o.rule, o.text) for o in found] == [(MACHINE_PATH, "/tmp/rows.jsonl")], report(found)


def test_a_folder_is_read_notebook_by_notebook_and_reported_grouped(tmp_path):
    write(tmp_path, result({"text/plain": "False"}), name="02_b.ipynb")
    write(tmp_path, stream("ok\n"), stream("see /tmp/x\n"), name="01_a.ipynb")
    (tmp_path / "01_a.kernel.log").write_text("Traceback (most recent call last): not a notebook")
    found = folder_offences(tmp_path, [])
    assert [(o.notebook, o.rule) for o in found] == [("01_a.ipynb", MACHINE_PATH), ("02_b.ipynb", BARE_BOOLEAN)]
    assert report(found).splitlines() == [
        "01_a.ipynb: 1 offence(s)",
        "  cell 2 `show(value)`: machine path: /tmp/x",
        "02_b.ipynb: 1 offence(s)",
        "  cell 2 `show(value)`: bare boolean: False",
    ]


def test_the_model_card_shows_a_project_model_folder_as_a_project_path():
    from helpers import ROOT
    from helpers.model import ModelCard, describe

    card = ModelCard("m", str(ROOT / ".cache" / "m"), "transformers", 1, "float32", "cpu", 0.1, "chatml", "</s>")
    assert describe(card)["source"] == str(Path(".cache") / "m")
    assert describe(ModelCard(**{**vars(card), "source": "unsloth/m"}))["source"] == "unsloth/m"


def test_executed_notebooks_of_the_smoke_chain_read_cleanly(smoke_chain):
    """Issue 26 item 7, on what a learner would open: every executed notebook of the chain passes the output check."""
    assert smoke_chain.returncode == 0, smoke_chain.output[-3000:]
    folder = executed_dir(RunFolder(smoke_chain.run_dir, "cpu-smoke"))
    assert sorted(p.stem for p in folder.glob("*.ipynb")) == [step.notebook for step in CHAIN]
    found = folder_offences(folder, [*default_machine_paths(), smoke_chain.run_dir.parent])
    assert not found, f"{len(found)} output(s) a learner should not see:\n{report(found)}"
