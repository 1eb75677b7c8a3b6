"""The HTML report of a run (DESIGN § 3): ``build_report(run_dir)`` → ``report.html`` + ``figures/*.png``.

``figures`` draws the matplotlib figures (Agg backend) from tables and arrays; ``html`` gathers a run
directory's artifacts into sections and renders the jinja2 template (autoescape on) into one self-contained
file. ``probe_section`` adds the head-probing and sanity-check section when those studies have run.
"""

from evidrift.report.html import build_report, load_run_config

__all__ = ["build_report", "load_run_config"]
