"""Implementation profiles: which code runs the model.

A profile turns a resolved ``ModelSpec`` and a ``Workload`` into the timelines of a step.
``reference`` is vramfit's own loop (``vramfit.measure.models``), written op by op in
``vramfit.estimate.training`` / ``inference``; ``hf`` is Hugging Face transformers' modeling
code, described as a graph of ops (``vramfit.estimate.profiles.hf``) that the generic schedules
of ``vramfit.estimate.schedule`` replay. A new implementation is one new module here.
"""
