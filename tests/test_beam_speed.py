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


def _stateful_dofn_class():
    import apache_beam as beam
    from apache_beam.coders import VarIntCoder
    from apache_beam.transforms import userstate
    from apache_beam.transforms.timeutil import TimeDomain

    class Stateful(beam.DoFn):
        SEEN = userstate.BagStateSpec("seen", VarIntCoder())
        FLUSH = userstate.TimerSpec("flush", TimeDomain.WATERMARK)

        def process(self, element, seen=beam.DoFn.StateParam(SEEN), flush=beam.DoFn.TimerParam(FLUSH)):
            yield element

        @userstate.on_timer(FLUSH)
        def on_flush(self):
            return []

    return Stateful


def test_dofn_specs_are_the_originals_and_follow_the_dofns_own_methods():
    import apache_beam as beam
    from apache_beam.transforms import userstate

    beam_speed.install()
    original = userstate.get_dofn_specs.__wrapped__
    stateful = _stateful_dofn_class()()
    for dofn in (stateful, beam.DoFn(), core.CallableWrapperDoFn(len), core.CallableWrapperDoFn(_DoFn().process)):
        want = original(dofn)
        first = userstate.get_dofn_specs(dofn)
        assert first == want == userstate.get_dofn_specs(dofn), dofn
        assert id(dofn) in beam_speed.SPECS, "the answer is kept"
        first[0].add("mutated")  # a caller that changes its sets changes no later answer
        assert userstate.get_dofn_specs(dofn) == want, dofn
    assert {s.name for s in userstate.get_dofn_specs(stateful)[0]} == {"seen"}
    assert len(userstate.get_dofn_specs(stateful)[1]) == 1  # the timer (Beam names it "ts-flush")
    assert userstate.is_stateful_dofn(stateful) and not userstate.is_stateful_dofn(beam.DoFn())

    # A method set on the instance after an answer was kept: the DoFn is asked again.
    class Plain(beam.DoFn):
        def process(self, element):
            yield element

    plain = Plain()
    assert userstate.get_dofn_specs(plain) == (set(), set())
    plain.process = _stateful_dofn_class()().process
    assert userstate.get_dofn_specs(plain) == original(plain) and original(plain)[0], "the new method's state"
    plain.process = Plain().process
    assert userstate.get_dofn_specs(plain) == (set(), set())
    # An instance attribute that is not a method hides the class's method of that name from Beam.
    assert userstate.get_dofn_specs(stateful)[0]
    stateful.process = lambda element: [element]
    assert userstate.get_dofn_specs(stateful) == original(stateful) == (set(), set())


def test_dofn_specs_keep_no_dofn_alive():
    import weakref

    from apache_beam.transforms import userstate

    beam_speed.install()
    dofn = core.CallableWrapperDoFn(_DoFn().process)
    userstate.get_dofn_specs(dofn)
    key, ref = id(dofn), weakref.ref(dofn)
    assert key in beam_speed.SPECS
    del dofn
    gc.collect()
    assert ref() is None and key not in beam_speed.SPECS, "a DoFn is freed, and leaves the cache, once Beam drops it"
