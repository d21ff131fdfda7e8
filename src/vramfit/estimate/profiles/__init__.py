"""Implementation profiles: which code runs the model.

A profile turns a resolved ``ModelSpec`` and a ``Workload`` into the timelines of a step.
``reference`` is vramfit's own loop (``vramfit.measure.models``), written op by op in
``vramfit.estimate.training`` / ``inference``; ``hf`` is Hugging Face transformers' modeling
code, described as a graph of ops (``vramfit.estimate.profiles.hf``) that the generic schedules
of ``vramfit.estimate.schedule`` replay. A new implementation is one new module here.

``vramfit.estimate.profiles.reference`` describes the reference loop on the same op library;
where its ``unsupported`` says nothing (all but mixture-of-experts, a declared ``--params``
and fused q/k/v with rotary positions and grouped K/V) it makes the hand-written program's
allocator requests exactly (tests/estimate/test_reference_profile.py). ``--impl reference``
still runs the hand-written program until the rest is ported.
"""
