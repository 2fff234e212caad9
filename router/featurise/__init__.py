"""Prompt featurisers: prompt text -> unit-norm float32 context vectors.

Pick one by URL, as the ``featuriser`` setting does:

>>> featuriser = featuriser_from_url("hashing://?dim=128")
>>> featuriser.name, featuriser.encode(["a prompt", "another prompt"]).shape
('hashing-128', (2, 128))

``minilm://`` (or ``minilm://?max_tokens=128&keep=tail&threads=2&cache=4096``)
gives the all-MiniLM-L6-v2 encoder; see :class:`MiniLMFeaturiser` for the
parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qsl, urlsplit

from .base import Featuriser
from .hashing import HashingFeaturiser
from .minilm import MiniLMFeaturiser

__all__ = ["Featuriser", "HashingFeaturiser", "MiniLMFeaturiser", "featuriser_from_url"]

# scheme -> (constructor, query parameter -> its type)
_BACKENDS: dict[str, tuple[Callable[..., Featuriser], dict[str, type]]] = {
    "hashing": (HashingFeaturiser, {"dim": int}),
    "minilm": (MiniLMFeaturiser, {"max_tokens": int, "keep": str, "threads": int, "cache": int}),
}


def featuriser_from_url(url: str) -> Featuriser:
    """Build the featuriser a URL names: the scheme picks the backend, the
    query string holds its keyword arguments.

    >>> featuriser_from_url("hashing://").dim
    384
    >>> featuriser_from_url("bow://")
    Traceback (most recent call last):
    ...
    ValueError: unknown featuriser scheme 'bow' in 'bow://'; known schemes: hashing://, minilm://
    """
    parts = urlsplit(url)
    known = ", ".join(f"{scheme}://" for scheme in _BACKENDS)
    if parts.scheme not in _BACKENDS:
        raise ValueError(f"unknown featuriser scheme {parts.scheme!r} in {url!r}; known schemes: {known}")
    # A host or path is a mistyped query (``minilm://max_tokens=128``), not something to ignore.
    if parts.netloc or parts.path.strip("/") or parts.fragment:
        raise ValueError(f"featuriser URL {url!r} takes parameters only after '?'")
    constructor, parameter_types = _BACKENDS[parts.scheme]
    kwargs = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)):
        if key not in parameter_types:
            accepted = ", ".join(parameter_types)
            raise ValueError(f"{parts.scheme}:// has no parameter {key!r}; it takes {accepted}")
        convert = parameter_types[key]
        try:
            kwargs[key] = convert(value)
        except ValueError:
            raise ValueError(f"{parts.scheme}:// {key}={value!r} is not an {convert.__name__}") from None
    return constructor(**kwargs)
