"""Lesson 08, step 4: an Ollama Modelfile whose Go template renders exactly the model's own chat template."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from helpers import chat
from helpers.model import adds_bos, end_of_turn_ids, end_of_turn_token

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def modelfile(gguf_name: str, tokenizer: PreTrainedTokenizerBase, system: str) -> str:
    """An Ollama Modelfile: the GGUF, the chat template in Go-template form, a stop for every end-of-turn token."""
    template = ollama_template(tokenizer)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in end_of_turn_ids(tokenizer)]
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += ["PARAMETER temperature 0", f'SYSTEM """{system}"""', ""]
    return "\n".join(lines)


def ollama_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """The chat template as Ollama's Go template, derived by rendering the model's own Jinja template around marker
    contents: each message is prefix + content + suffix, the suffix ending with the end-of-turn token (and the
    whitespace after it), then the generation prompt. A template's leading BOS (Llama 3's `{{ bos_token }}`) is left
    out when the GGUF makes Ollama add BOS itself, so the prompt starts with exactly one."""
    pieces = role_pieces(tokenizer)
    go = [pieces["start"] + "{{- range .Messages }}"]
    for role in ("system", "user", "assistant"):
        prefix, suffix = pieces[role]
        go.append(f'{{{{- if eq .Role "{role}" }}}}{prefix}{{{{ .Content }}}}{suffix}{{{{ end }}}}')
    go.append("{{- end }}" + pieces["generation"])
    return "".join(go)


def role_pieces(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Per role the text before and after a message's content, and the generation prompt."""
    eot = end_of_turn_token(tokenizer)
    marks = [f"MARKER{i}XYZZY" for i in range(3)]
    messages = chat.messages(question=marks[1], system=marks[0], answer=marks[2])
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token or ""
    start = ""
    if bos and text.startswith(bos):  # the conversation's BOS, not the system message's: once, before every turn
        text, prompt = text[len(bos) :], prompt[len(bos) :]
        start = "" if adds_bos(tokenizer) else bos
    gaps, cursor = [], 0
    for mark in marks:
        at = text.index(mark, cursor)
        gaps.append(text[cursor:at])
        cursor = at + len(mark)
    gaps.append(text[cursor:])

    # gaps: [prefix0, suffix0+prefix1, suffix1+prefix2, suffix2]; split each middle gap after the end-of-turn token
    def split(gap: str) -> tuple[str, str]:
        cut = gap.index(eot) + len(eot)
        while cut < len(gap) and gap[cut] in " \n":
            cut += 1
        return gap[:cut], gap[cut:]

    s0, p1 = split(gaps[1])
    s1, p2 = split(gaps[2])
    after_user = prompt[prompt.index(marks[1]) + len(marks[1]) :]
    return {"system": [gaps[0], s0], "user": [p1, s1], "assistant": [p2, gaps[3]],
            "generation": after_user[len(s1) :], "start": start}  # fmt: skip


def render_ollama(template: str, messages: list[dict[str, str]]) -> str:
    """Render the Go template this module writes (range over messages, role branches), as Ollama does for chat."""

    match = re.match(r"(.*?)\{\{- range \.Messages \}\}(.*)\{\{- end \}\}(.*)$", template, re.S)
    if match is None:
        raise ValueError("not a Modelfile TEMPLATE written by helpers.ollama (no range over .Messages)")
    start, body, tail = match.groups()
    branches = dict(re.findall(r'\{\{- if eq \.Role "(\w+)" \}\}(.*?)\{\{ end \}\}', body, re.S))
    out = [branches[m["role"]].replace("{{ .Content }}", m["content"]) for m in messages]
    return start + "".join(out) + tail
