"""Pipeline construction without Beam's repeated signature inspection.

While it builds and translates a pipeline, Beam asks `core.get_function_args_defaults` for the
arguments of every method of every DoFn many times over (`userstate.get_dofn_specs`, called for each
transform at each translation): about 100,000 `inspect.signature` calls for this project's ~1,000
transforms, 40% of a small data set's whole pipeline time. The answer depends only on the function
(and on whether it is bound), so `install()` memoises it per function object, weakly: functions
that are collected leave the cache with them. Callables that cannot be weakly referenced, or that
are not hashable, are inspected as before. The answers are the same (tests/test_beam_speed.py), and so
are the records: the pipeline tests, which check the records' contents, pass unchanged.

The same construction asks `PipelineOptions.view_as` for a view of the pipeline's options about 800
times; each view builds an argparse parser over every option of its class and parses the flags
again (about 10% of a small pipeline's time: 5.6 -> 5.0 s, median of 4 alternating runs in one
process on a loaded machine). A view holds nothing of its own: it reads and writes the one
`_all_options` dict of the options it was taken from, so `install()` keeps the first view of each
class per options object (weakly) and hands it out again while that dict is still the one.

Only the process that builds the pipeline is changed; runners' workers are not.
"""

from __future__ import annotations

import types
import weakref

CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # function -> {type of the callable: answer}
VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # options -> {options class: view}


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


def _memoised_view(original, views=VIEWS):
    def view_as(self, cls):
        try:
            per_class = views.get(self)
        except TypeError:  # not weakly referenceable, or not hashable
            return original(self, cls)
        view = per_class.get(cls) if per_class is not None else None
        if view is None or view._all_options is not self._all_options or view._flags is not self._flags:
            view = original(self, cls)
            views.setdefault(self, {})[cls] = view
        return view

    view_as.__wrapped__ = original
    view_as.__doc__ = original.__doc__
    return view_as


def install() -> None:
    """Memoises `apache_beam.transforms.core.get_function_args_defaults` and
    `PipelineOptions.view_as` (idempotent)."""
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.transforms import core

    original = getattr(core, "get_function_args_defaults", None)
    if original is not None and not hasattr(original, "__wrapped__"):  # another Beam version, or done already
        core.get_function_args_defaults = _memoised(original)
    view_as = PipelineOptions.__dict__.get("view_as")
    if view_as is not None and not hasattr(view_as, "__wrapped__"):
        PipelineOptions.view_as = _memoised_view(view_as)
