"""The diffusion study (DESIGN § 11): does fine-tuning a text-to-image model trade its cross-attention maps'
localization for image fidelity? Modules: ``config`` (the ``diffusion:`` section), ``data`` (phantom sets with
reports, planted markers, lesion-free twins), ``models``, ``training``, ``attention`` (capture through
diffusers' attention processors), ``scores`` (localization, baselines), ``fidelity``, ``drift_tables``,
``gates``, ``pipeline`` (the steps), ``report_section``."""
