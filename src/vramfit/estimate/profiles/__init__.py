"""Implementation profiles: which code runs the model.

A profile turns a resolved ``ModelSpec`` and a ``Workload`` into the timelines of a step.
``reference`` is vramfit's own loop (``vramfit.measure.models``) and ``hf`` Hugging Face
transformers' modeling code, each described as a graph of ops on the shared op library
(``vramfit.estimate.ops``), which the generic machinery of ``vramfit.estimate.graph``
replays (forward, backward, checkpoint recompute; ``vramfit.estimate.schedule`` for the hf
profile's steps). A new implementation is one new module here.
"""
