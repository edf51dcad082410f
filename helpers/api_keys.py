"""Where an API key may go: which host OpenAI's key belongs to, which hosts are this machine, and whether a
profile's `prepare.api_key_env` is a variable's name or a key pasted in its place.

No imports from the rest of the project: the profile loader and the API client both check with these rules.
Nothing here ever puts a value that may be a key into a message.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

OPENAI_HOST = "api.openai.com"
OPENAI_KEY_NAMES = ("OPENAI_API_KEY", "OPENAI_ADMIN_KEY")  # keys that belong to OpenAI and go nowhere else
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Token formats with a fixed prefix (Hugging Face, OpenAI and others, GitHub, GitLab, Slack, AWS, Google), compared
# case-sensitively: a variable such as HF_TOKEN is upper case, the token hf_AbC... is not.
KEY_PREFIX = re.compile(r"hf_|sk-|sk_|rk_|gh[opsur]_|github_pat_|glpat-|xox[abprs]-|AKIA|ASIA|AIza|ya29\.")
LONG_ENOUGH_FOR_A_KEY = 20


def is_local_host(host: str) -> bool:
    """Whether `host` (a URL's hostname) is this machine: localhost or a loopback address."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def is_openai_url(url: str) -> bool:
    """Whether `url` is OpenAI's own API over https (where OPENAI_API_KEY belongs)."""
    parts = urlsplit(url)
    return parts.scheme == "https" and (parts.hostname or "").lower() == OPENAI_HOST


def origin(url: str) -> str:
    """scheme://host:port of `url`, without any user name or password written into it."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def looks_like_key(value: str) -> bool:
    """Whether `value` looks like a secret rather than a variable's name: a known token prefix, letters of both
    cases mixed with digits, a long run of hex, or something long that no variable could be called."""
    if len(value) < LONG_ENOUGH_FOR_A_KEY:
        return False
    mixed = any(c.islower() for c in value) and any(c.isupper() for c in value) and any(c.isdigit() for c in value)
    return bool(
        KEY_PREFIX.match(value)
        or mixed
        or re.fullmatch(r"[0-9a-fA-F]{32,}", value)
        or not VARIABLE_NAME.fullmatch(value)
    )


def key_name_problem(name: str, field: str = "prepare.api_key_env") -> str | None:
    """What is wrong with `name` as the environment variable that holds a key (never echoing it), or None."""
    if looks_like_key(name):
        return (
            f"{field} does not look like a variable name; it looks like a key itself, which must never be written "
            "in a profile. Put the key in the environment or the git-ignored .env file under a name such as "
            f"VLLM_API_KEY, and write that name in {field}."
        )
    if not VARIABLE_NAME.fullmatch(name):
        return (
            f"{field} must be the name of an environment variable (letters, digits and _, not starting with a "
            "digit), such as VLLM_API_KEY."
        )
    return None


def key_host_problem(name: str, url: str, field: str = "prepare.api_key_env") -> str | None:
    """What is wrong with sending the key in variable `name` to `url`, or None: OpenAI's keys go only to OpenAI."""
    if name.upper() not in OPENAI_KEY_NAMES or is_openai_url(url):
        return None
    return (
        f"{field} names {name}, but the server is {origin(url)}, not OpenAI "
        f"(https://{OPENAI_HOST}): a key goes only to the host it belongs to. Put this server's own key in a variable "
        f"of its own (such as VLLM_API_KEY) and name that in {field}, or leave it empty for a server that needs no key."
    )
