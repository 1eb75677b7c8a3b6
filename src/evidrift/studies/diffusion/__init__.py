"""The diffusion study (ARCHITECTURE §11): does fine-tuning a text-to-image model trade its attention maps'
localization for image fidelity? Modules: ``config`` (the ``diffusion:`` section and presets), ``data``
(phantom sets with reports, planted markers, lesion-free twins), ``models``, ``training``, ``sampling``,
``attention`` (capture through diffusers' attention processors), ``scores`` (localization, baselines),
``fidelity``, ``gates``, ``pipeline`` (the steps on ``evidrift.core.steps``), ``report_section``."""
