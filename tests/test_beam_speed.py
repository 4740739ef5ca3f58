"""`pipeline.beam_speed`: Beam's argument inspection memoised per function, with the same answers."""

from __future__ import annotations

import gc

from apache_beam.transforms import core

from pipeline import beam_speed


class _DoFn:
    def process(self, element, side=3, *rest):
        return [element]


def _free(a, b=1):
    return a + b


def test_memoised_answers_are_the_originals_and_callers_own_their_lists():
    beam_speed.install()
    original = core.get_function_args_defaults.__wrapped__
    fn = _DoFn()
    for f in (fn.process, _DoFn.process, _free, lambda x, y=2: x, len, str.upper):
        want = original(f)
        first = core.get_function_args_defaults(f)
        assert first == want == core.get_function_args_defaults(f), f
        first[0].append("mutated")  # a caller that changes its lists changes no later answer
        assert core.get_function_args_defaults(f) == want, f
    # Bound and unbound forms of one function are told apart (`self` is bound in one).
    assert core.get_function_args_defaults(fn.process)[0] == ["element", "side"]
    assert core.get_function_args_defaults(_DoFn.process)[0] == ["self", "element", "side"]


def test_the_cache_keeps_no_function_alive():
    import weakref

    beam_speed.install()

    def make():
        return lambda q, r=1: q

    f = make()
    core.get_function_args_defaults(f)
    assert f in beam_speed.CACHE
    ref = weakref.ref(f)
    del f
    gc.collect()
    assert ref() is None, "a memoised function is freed once the pipeline drops it"
