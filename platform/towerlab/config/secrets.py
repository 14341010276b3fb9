"""What counts as a credential in a recipe value, an override, an environment variable or a manifest, and how it is
redacted before anything is logged, written or shown.

Three kinds of secret are recognised:
- credentials inside URIs: the user-info part (`user:password@`, `TOKEN@`) and query parameters named like a secret
  (`?token=`, `&key=`, `sig=`, `X-Amz-Signature=`);
- any value whose key is named like a secret (password, token, secret, key, credential, auth, ...): the key's last
  word decides, so `data.augment.token_mask` is not a secret and `hub.auth_token` is;
- the values of environment variables named like a secret (HF_TOKEN, MLFLOW_TRACKING_PASSWORD, ...): a recipe
  value interpolated from one (`${oc.env:HF_TOKEN}`) is resolved before anything sees the Recipe, so the value
  itself is what is recognised and replaced wherever it appears.

It lives in config/ because every layer that writes values out (tracking's params and artifacts, cluster's job
specs and manifests, the command line's messages) needs the same rule, and config is below all of them.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

MASK = "***"
# the last word of a key (split at _ - . and case changes) that makes its value a secret
SECRET_WORDS = {"password", "passwd", "pwd", "passphrase", "secret", "token", "key", "apikey", "credential",
                "credentials", "auth", "sig", "signature", "cookie", "session"}
# anywhere in a key: AWS_SECRET_ACCESS_KEY, AWS_ACCESS_KEY_ID, MY_PRIVATE_KEY_FILE
SECRET_PARTS = ("password", "passwd", "secret", "credential", "private_key", "access_key", "api_key", "apikey")
# an environment value shorter than this is not scrubbed from text: `X_TOKEN=1` must not mask every "1"
MIN_ENV_SECRET = 8

_URI = re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
_USERINFO = re.compile(r"(://)[^/@\s?#]+@")
_QUERY_PARAM = re.compile(r"([?&;])([^=&#;\s]+)=([^&#;\s]*)")
_ASSIGNMENT = re.compile(r"(?<![\w.\-])([A-Za-z_][\w.\-]*)([=:]\s?)([^\s'\",;]+)")


def _words(key: str) -> list[str]:
    key = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key)  # authToken -> auth_Token
    return [w for w in re.split(r"[^A-Za-z0-9]+", key.lower()) if w]


def is_secret_key(key: str) -> bool:
    """True for a key (a recipe key's last part, an environment variable, a query parameter) that names a secret."""
    last = str(key).rsplit(".", 1)[-1]
    words = _words(last)
    if not words:
        return False
    joined = "_".join(words)
    return words[-1] in SECRET_WORDS or any(p in joined for p in SECRET_PARTS)


def env_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment's secret-named variables, longest first (so a value inside another goes second)."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if is_secret_key(k) and len(v) >= MIN_ENV_SECRET}
    return sorted(values, key=len, reverse=True)


def redact_uri(uri: str) -> str:
    """The URI without user-info and with secret-named query parameters masked."""
    out = _USERINFO.sub(rf"\1{MASK}@", uri)

    def param(m: re.Match) -> str:
        return f"{m[1]}{m[2]}={MASK}" if is_secret_key(m[2]) and m[3] else m[0]

    return _QUERY_PARAM.sub(param, out)


def redact_text(text: str, environ: Mapping[str, str] | None = None) -> str:
    """A message, a log line or a YAML text with every recognised credential replaced by ***: URIs' credentials,
    `secret_key=value` / `secret_key: value` pairs, and the values of secret-named environment variables."""
    for value in env_secrets(environ):
        text = text.replace(value, MASK)
    text = _URI.sub(lambda m: redact_uri(m[0]), text)

    def assignment(m: re.Match) -> str:
        if is_secret_key(m[1]) and m[3] != MASK and not m[3].startswith("${"):
            return f"{m[1]}{m[2]}{MASK}"
        return m[0]

    return _ASSIGNMENT.sub(assignment, text)


def redact_value(key: str, value: Any, environ: Mapping[str, str] | None = None) -> Any:
    """One value as it may be shown: masked whole when its key names a secret, else its text redacted."""
    if isinstance(value, bool) or value is None or value == "":
        return value
    if is_secret_key(key) and isinstance(value, (str, int, float)):
        return MASK
    if isinstance(value, str):
        return redact_text(value, environ)
    if isinstance(value, (list, tuple, Mapping)):  # data.paths, data.sources: each entry as a value of its own
        return redact_tree(value, environ, key)
    return value


def redact_tree(node: Any, environ: Mapping[str, str] | None = None, key: str = "") -> Any:
    """A plain tree (dicts, lists, scalars) with every secret redacted; the input is not changed."""
    if isinstance(node, Mapping):
        return {k: redact_tree(v, environ, str(k)) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [redact_tree(v, environ, key) for v in node]
    return redact_value(key, node, environ)


def redact_params(params: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Flattened params (`a.b.c`: value) as MLflow may record them: the last part of each key decides."""
    return {k: redact_value(k, v, environ) for k, v in params.items()}


def redacted_yaml(obj: Any) -> str:
    """A dataclass tree (the Recipe, a Sweep) or a plain mapping as YAML with every secret redacted: what the
    recipe.yaml artifact and a checkpoint's recipe copy hold."""
    import dataclasses

    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(OmegaConf.structured(obj), resolve=True) if dataclasses.is_dataclass(obj) else obj
    return OmegaConf.to_yaml(redact_tree(tree))


def has_credentials(value: Any, key: str = "") -> bool:
    """True when showing `value` (under `key`) would show a secret."""
    return redact_value(key, value) != value
