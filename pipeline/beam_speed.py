"""Pipeline construction without Beam's repeated signature inspection.

While it builds and translates a pipeline, Beam asks `core.get_function_args_defaults` for the
arguments of every method of every DoFn many times over (`userstate.get_dofn_specs`, called for each
transform at each translation): about 100,000 `inspect.signature` calls for this project's ~1,000
transforms, 40% of a small data set's whole pipeline time. The answer depends only on the function
(and on whether it is bound), so `install()` memoises it per function object, weakly: functions
that are collected leave the cache with them. Callables that cannot be weakly referenced, or that
are not hashable, are inspected as before. The answers are the same (tests/test_beam_speed.py), and so
are the records: the pipeline tests, which check the records' contents, pass unchanged.

Only the process that builds the pipeline is changed; runners' workers are not.
"""

from __future__ import annotations

import types
import weakref

CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # function -> {type of the callable: answer}


def _memoised(original, cache=CACHE):
    def get_function_args_defaults(f):
        func = f.__func__ if isinstance(f, types.MethodType) else f
        kind = type(f)  # a bound method (its first argument bound) or the function itself
        try:
            per_kind = cache.get(func)
        except TypeError:  # not weakly referenceable, or not hashable
            return original(f)
        if per_kind is not None and kind in per_kind:
            args, defaults = per_kind[kind]
        else:
            args, defaults = original(f)
            try:
                cache.setdefault(func, {})[kind] = (list(args), list(defaults))
            except TypeError:
                return args, defaults
        return list(args), list(defaults)  # callers get their own lists, as from the original

    get_function_args_defaults.__wrapped__ = original
    return get_function_args_defaults


def install() -> None:
    """Memoises `apache_beam.transforms.core.get_function_args_defaults` (idempotent)."""
    from apache_beam.transforms import core

    original = getattr(core, "get_function_args_defaults", None)
    if original is None or hasattr(original, "__wrapped__"):  # another Beam version, or done already
        return
    core.get_function_args_defaults = _memoised(original)
