"""placeholder"""


def write_report(config, paths, ctx):
    (paths.root / "report.html").write_text("<html></html>")
