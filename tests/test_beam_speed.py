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


def test_options_views_are_kept_and_still_share_their_options():
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

    beam_speed.install()
    original = PipelineOptions.view_as.__wrapped__
    options = PipelineOptions(["--runner", "DirectRunner", "--direct_num_workers", "2"])
    view = options.view_as(DirectOptions)
    assert options.view_as(DirectOptions) is view, "the view is kept"
    fresh = original(options, DirectOptions)
    assert vars(fresh._visible_options) == vars(view._visible_options)
    assert view.direct_num_workers == fresh.direct_num_workers == 2
    # A write through any view is seen through every other view and the options themselves.
    options.view_as(StandardOptions).streaming = True
    view.direct_num_workers = 3
    assert original(options, StandardOptions).streaming is True
    assert original(options, DirectOptions).direct_num_workers == 3
    assert options.get_all_options()["direct_num_workers"] == 3
    # Other options objects get their own views, from their own flags.
    other = PipelineOptions(["--direct_num_workers", "5"])
    assert other.view_as(DirectOptions) is not view
    assert other.view_as(DirectOptions).direct_num_workers == 5


def test_options_views_keep_no_options_alive():
    import weakref

    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

    beam_speed.install()
    options = PipelineOptions([])
    options.view_as(DirectOptions)
    assert options in beam_speed.VIEWS
    ref = weakref.ref(options)
    del options
    gc.collect()
    assert ref() is None
