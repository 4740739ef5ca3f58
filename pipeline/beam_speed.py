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

Beam also asks `userstate.get_dofn_specs` for the state and timer specs of each DoFn about seven
times while it builds, translates and runs a pipeline (3,364 calls for 476 DoFns in a small data
set's build; 0.40 s of its 2.5 s), each walking `dir()` of the DoFn and wrapping every method. The
answer depends only on the DoFn's methods, so `install()` keeps it per DoFn object (weakly, by
identity) with the class and the instance's own methods it was computed from, and computes it again
when any of them is no longer the same (a method set on the instance, another class). A class whose
methods are replaced after it built a pipeline is not seen. Callers get their own sets.

Only the process that builds the pipeline is changed; runners' workers are not (the in-memory
DirectRunner runs its bundles in the same process, so there its workers benefit too).
"""

from __future__ import annotations

import types
import weakref

CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # function -> {type of the callable: answer}
VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # options -> {options class: view}
SPECS: dict = {}  # id(DoFn) -> (weak ref to it, its class, its own methods (weak refs), (states, timers))


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


def _own_methods(dofn) -> list:
    """What of the DoFn's instance attributes `get_dofn_specs` reads: those that are methods (a
    `beam.Map`'s DoFn may hold the mapped callable as its own `process`), and the names of those that
    hide an attribute of its class (a method of the class is then not read). `(name, method or None)`."""
    klass = type(dofn)
    return [
        (name, value if isinstance(value, types.MethodType) else None)
        for name, value in vars(dofn).items()
        if isinstance(value, types.MethodType) or hasattr(klass, name)
    ]


def _unchanged(kept: list, own: list) -> bool:
    """Whether `_own_methods` gives what it gave when `kept` (its methods as weak references) was kept."""
    if [name for name, _ in kept] != [name for name, _ in own]:
        return False
    return all((None if ref is None else ref()) is value for (_, ref), (_, value) in zip(kept, own))


def _memoised_specs(original, cache=SPECS):
    def get_dofn_specs(dofn):
        try:
            own = _own_methods(dofn)
        except TypeError:  # no instance dict
            return original(dofn)
        key = id(dofn)
        held = cache.get(key)
        if held is not None and held[0]() is dofn and held[1] is type(dofn) and _unchanged(held[2], own):
            states, timers = held[3]
        else:
            states, timers = original(dofn)
            try:  # weakly held, by identity: the cache keeps nothing alive and never calls __eq__
                ref = weakref.ref(dofn, lambda _, key=key: cache.pop(key, None))
                methods = [(name, None if value is None else weakref.ref(value)) for name, value in own]
            except TypeError:  # not weakly referenceable
                return states, timers
            cache[key] = (ref, type(dofn), methods, (frozenset(states), frozenset(timers)))
        return set(states), set(timers)  # callers get their own sets, as from the original

    get_dofn_specs.__wrapped__ = original
    get_dofn_specs.__doc__ = original.__doc__
    return get_dofn_specs


def install() -> None:
    """Memoises `apache_beam.transforms.core.get_function_args_defaults`,
    `PipelineOptions.view_as` and `userstate.get_dofn_specs` (idempotent)."""
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.transforms import core, userstate

    original = getattr(core, "get_function_args_defaults", None)
    if original is not None and not hasattr(original, "__wrapped__"):  # another Beam version, or done already
        core.get_function_args_defaults = _memoised(original)
    view_as = PipelineOptions.__dict__.get("view_as")
    if view_as is not None and not hasattr(view_as, "__wrapped__"):
        PipelineOptions.view_as = _memoised_view(view_as)
    specs = getattr(userstate, "get_dofn_specs", None)
    if specs is not None and not hasattr(specs, "__wrapped__"):
        userstate.get_dofn_specs = _memoised_specs(specs)
