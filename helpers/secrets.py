"""Tokens (Hugging Face, OpenAI-compatible APIs) come from the environment or a git-ignored `.env` file.

Never from a notebook cell or a papermill parameter: those end up in executed notebooks and run folders.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from helpers import ROOT

SECRET_NAMES = ("HF_TOKEN", "OPENAI_API_KEY")

# Which variables another process (a learner's kernel, the llama.cpp server) must not inherit. Names are matched by
# whole words (split at `_`) and by telling fragments, so tomorrow's MY_SERVICE_PASSWORD goes too; values by shape,
# so a credential under an innocent name (a Redis URL with a user and password in it) goes as well.
SECRET_WORDS = {"TOKEN", "TOKENS", "KEY", "KEYS", "PASS", "PWD", "JWT", "DSN", "AUTH", "PAT", "SALT", "SIGNATURE"}
SECRET_FRAGMENTS = ("SECRET", "PASSWORD", "PASSWD", "PASSPHRASE", "ASKPASS", "CREDENTIAL", "PRIVATE", "COOKIE",
                    "SESSION", "APIKEY", "BEARER", "AUTHORIZATION", "CONNECTION_STRING")  # fmt: skip
SECRET_EXACT = {
    "DATABASE_URL",
    "SSH_AUTH_SOCK",  # agent sockets hold no secret value, but they sign and push as the instructor
    "GPG_AGENT_INFO",
    "HF_TOKEN_PATH",  # replaced below: the instructor's stored Hugging Face login
    "NETRC",  # requests sends ~/.netrc's logins to their hosts by itself; replaced below
}
SECRET_PREFIXES = ("HF_OIDC_",)  # Hugging Face's token exchange in CI
NOT_SECRET = {"PWD"}  # the working directory, not a MySQL password
SECRET_VALUE = re.compile(
    r"://[^/\s:@]*:[^/\s@]+@"  # a URL with a password in it (scheme, user, colon, password, at-sign)
    r"|^(hf_|sk-|ghp_|gho_|ghs_|ghu_|github_pat_|glpat-|xox[abpr]-)[A-Za-z0-9_\-]{16,}"  # well-known token shapes
    r"|^(AKIA|ASIA)[0-9A-Z]{16}$"  # AWS access key ids
    r"|^eyJ[A-Za-z0-9_\-]+\.eyJ[A-Za-z0-9_\-]+\."  # a JSON Web Token
)
NO_LOGIN_FILE = ".no-stored-login"  # never written: the Hub libraries and requests find no stored login there


def is_secret(name: str, value: str = "") -> bool:
    """Whether an environment variable looks like a credential, by its name or by its value."""
    upper = name.upper()
    if upper in NOT_SECRET:
        return False
    return (
        upper in SECRET_EXACT
        or upper in SECRET_NAMES
        or upper.startswith(SECRET_PREFIXES)
        or not SECRET_WORDS.isdisjoint(upper.split("_"))
        or any(fragment in upper for fragment in SECRET_FRAGMENTS)
        or bool(SECRET_VALUE.search(value))
    )


def environment_without_secrets(folder: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment (`os.environ` by default) for a process that must not act as the instructor: no variable
    that looks like a credential, and no stored login found implicitly (Hugging Face's token file, ~/.netrc):
    those point at a file in `folder` that does not exist. Separation, not a sandbox: the files stay readable."""
    environ = os.environ if environ is None else environ
    env = {k: v for k, v in environ.items() if not is_secret(k, v)}
    env.update(
        HF_TOKEN_PATH=str(folder / NO_LOGIN_FILE),
        HF_HUB_DISABLE_IMPLICIT_TOKEN="1",  # no token sent unless a call passes one
        NETRC=str(folder / NO_LOGIN_FILE),
    )
    return env


def load_secrets(path: Path = ROOT / ".env") -> None:
    """Read `.env` at the project root into the environment; variables already set take precedence. Not in a
    learner's kernel started by the classroom runner (LLM_SCHOOL_NO_SECRETS): the instructor's tokens stay out."""
    if os.environ.get("LLM_SCHOOL_NO_SECRETS"):
        return
    from dotenv import load_dotenv

    load_dotenv(path, override=False)


def secrets_status() -> dict[str, str]:
    """Which tokens are available, without their values."""
    return {name: "set (value hidden)" if os.environ.get(name) else "not set" for name in SECRET_NAMES}
