"""The HTML report machinery (ARCHITECTURE §3): ``html.render_report`` renders the sections a study
contributes into one self-contained ``report.html``; ``elements`` holds the section/table/figure building
blocks,
``figures`` the matplotlib figures (Agg backend), ``map_sections`` the map overlays and zone figures shared by
the studies, ``method_labels`` the display names of methods and layers. Which sections a report has is decided
by the studies (``studies.drift.report.build_report``)."""
