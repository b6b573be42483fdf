"""``vmm bench``: every figure that matters, each beside a baseline measured in the same run.

One module per area, each returning data (``stats.Section`` of rows of
figures) and never printing: ``boot``, ``exits``, ``guest_mm``,
``inspector``, ``scale``. ``host_baselines`` holds the C baselines as source
text and builds them with gcc on the fly; ``report`` renders (rich, JSON);
``cli`` drives. Figures are reported, never asserted.
"""
