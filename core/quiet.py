"""Known library noise, silenced where it is raised and nowhere else.

Each entry names the call that raises it and the library versions; a warning that says something
about the run is never filtered here.
"""
from __future__ import annotations

import contextlib
import warnings

PEFT_WRAP_WARNING = r"`is_gradient_checkpointing` is deprecated"
"""PEFT 0.21's ``PeftModel.__init__`` reads ``model.is_gradient_checkpointing``, which transformers 5.24
deprecated in favour of ``is_activation_checkpointing``: a ``FutureWarning`` on every training start,
decode, export and merge that says nothing about the run."""


@contextlib.contextmanager
def peft_wrapping():
    """Around a call that wraps a model in a ``PeftModel`` (``get_peft_model``,
    ``PeftModel.from_pretrained``): ``PEFT_WRAP_WARNING`` only, only there.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as seen:
    ...     warnings.simplefilter("always")
    ...     with peft_wrapping():
    ...         warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
    ...     warnings.warn("something else", FutureWarning)
    >>> [str(w.message) for w in seen]
    ['something else']
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_WRAP_WARNING, category=FutureWarning)
        yield
